//! `gitfleet import`: a collector config adopted as a new configuration, committed alone and
//! tagged; bad input leaves the repository as it was.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::common::{GitRepo, example, gitfleet};

/// A collector config as found on a host: valid, with `memory_limiter` after `batch`.
const ADOPTED: &str = "\
receivers:
  otlp:
    protocols:
      grpc: {}
processors:
  batch: {}
  memory_limiter:
    check_interval: 1s
    limit_mib: 512
exporters:
  debug: {}
service:
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch, memory_limiter]
      exporters: [debug]
";

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// `gitfleet import <args>` in `dir`, as a person with a Git identity; `stdin` is fed when given.
fn import(dir: &Path, args: &[&str], stdin: Option<&str>) -> Run {
    run(identified(gitfleet(), dir).arg("import").args(args), stdin)
}

fn identified(mut command: Command, dir: &Path) -> Command {
    command
        .current_dir(dir)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_NAME", "Platform Engineer")
        .env("GIT_AUTHOR_EMAIL", "platform@example.com")
        .env("GIT_COMMITTER_NAME", "Platform Engineer")
        .env("GIT_COMMITTER_EMAIL", "platform@example.com");
    command
}

fn run(command: &mut Command, stdin: Option<&str>) -> Run {
    let mut child = command
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("gitfleet runs");
    if let Some(text) = stdin {
        child.stdin.take().expect("stdin is piped").write_all(text.as_bytes()).expect("write stdin");
    }
    let output = child.wait_with_output().expect("gitfleet finishes");
    Run {
        code: output.status.code().expect("an exit code"),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// What must not change when an import is refused.
fn state(repo: &GitRepo) -> (String, String, String) {
    (repo.head(), repo.git(&["tag", "--list"]), repo.git(&["status", "--porcelain", "--untracked-files=all"]))
}

#[test]
fn an_adopted_config_is_committed_alone_tagged_and_can_be_rolled_out() {
    let repo = example();
    let host = tempfile::tempdir().expect("temp dir");
    std::fs::write(host.path().join("otelcol.yaml"), ADOPTED).expect("write");
    // Work in progress, staged: the import must not commit it.
    repo.write("fleets/draft.toml", "config = \"gateway\"\n");
    repo.git(&["add", "fleets/draft.toml"]);
    let before = repo.head();

    let adopted = host.path().join("otelcol.yaml").display().to_string();
    let done = import(repo.path(), &["--config", "edge", "--note", "Adopted from the edge hosts", &adopted], None);
    assert_eq!(done.code, 0, "{}{}", done.stdout, done.stderr);
    assert!(done.stdout.starts_with("Imported configs/edge.yaml as edge/v1 (commit "), "{}", done.stdout);
    assert!(done.stdout.contains("git push origin HEAD edge/v1"), "{}", done.stdout);
    assert!(
        done.stderr.contains("configs/edge.yaml:16: warning: `memory_limiter` should be the first processor"),
        "lint warnings are shown: {}",
        done.stderr
    );

    // One commit on top, with only the file, byte for byte; the draft is still staged.
    assert_eq!(repo.git(&["rev-parse", "HEAD~1"]), before);
    assert_eq!(
        repo.git(&["show", "--name-only", "--format=%s", "HEAD"]),
        "Import configuration edge from ".to_owned() + &adopted + "\n\nconfigs/edge.yaml"
    );
    assert_eq!(repo.git(&["show", "HEAD:configs/edge.yaml"]), ADOPTED.trim_end());
    assert_eq!(repo.git(&["status", "--porcelain"]), "A  fleets/draft.toml");
    assert_eq!(
        repo.git(&["for-each-ref", "--format=%(objecttype) %(contents:subject)", "refs/tags/edge/v1"]),
        "tag Adopted from the edge hosts"
    );
    assert_eq!(repo.git(&["rev-parse", "edge/v1^{commit}"]), repo.head());

    // Rolled out like any version: `check` sees the fleet on it.
    repo.git(&["restore", "--staged", "fleets/draft.toml"]);
    std::fs::remove_file(repo.path().join("fleets/draft.toml")).expect("remove the draft");
    repo.write("fleets/edge.toml", "config  = \"edge\"\nversion = \"v1\"\n");
    repo.commit("Run the adopted config on the edge fleet");
    let check = run(gitfleet().args(["check", "--repo"]).arg(repo.path()), None);
    assert_eq!(check.code, 0, "{}{}", check.stdout, check.stderr);
    assert!(
        check.stdout.lines().any(|l| l.trim_start().starts_with("edge ") && l.contains("edge/v1")),
        "{}",
        check.stdout
    );

    // From standard input, with a version of one's own; a JSON file keeps its kind.
    let done = import(repo.path(), &["--config", "from-stdin", "--version", "1.0.0", "-"], Some(ADOPTED));
    assert_eq!(done.code, 0, "{}", done.stderr);
    assert_eq!(repo.git(&["show", "from-stdin/1.0.0:configs/from-stdin.yaml"]), ADOPTED.trim_end());
    assert_eq!(
        repo.git(&["tag", "--list", "--format=%(contents:subject)", "from-stdin/1.0.0"]),
        "Imported from standard input"
    );
    std::fs::write(host.path().join("sdk.json"), "{\"sampling\": {\"ratio\": 0.1}}\n").expect("write");
    let json = host.path().join("sdk.json").display().to_string();
    let done = import(repo.path(), &["--config", "sdk-edge", &json], None);
    assert_eq!(done.code, 0, "{}", done.stderr);
    assert!(repo.path().join("configs/sdk-edge.json").is_file());
}

#[test]
fn a_refused_import_leaves_the_repository_as_it_was() {
    let repo = example();
    let host = tempfile::tempdir().expect("temp dir");
    let file = |name: &str, text: &str| {
        let path = host.path().join(name);
        std::fs::write(&path, text).expect("write");
        path.display().to_string()
    };
    let good = file("good.yaml", ADOPTED);
    let broken = file("broken.yaml", "receivers:\n  otlp: [\n");
    let undefined = file("undefined.yaml", &ADOPTED.replace("exporters: [debug]", "exporters: [otlphttp]"));
    repo.git(&["tag", "taken/v1"]);
    let before = state(&repo);
    let not_a_repo = tempfile::tempdir().expect("temp dir");
    let missing = host.path().join("missing.yaml").display().to_string();

    let cases: [(&[&str], i32, &str); 8] = [
        (&["--config", "bad", &broken], 1, "configs/bad.yaml:3: error: invalid YAML"),
        (&["--config", "bad", &undefined], 1, "configs/bad.yaml:17: error:"),
        (&["--config", "gateway", &good], 2, "gitfleet: configs/gateway.yaml already exists"),
        (&["--config", "taken", &good], 2, "gitfleet: the tag taken/v1 already exists"),
        (
            &["--config", "Edge Gateway", &good],
            2,
            "gitfleet: --config: name `Edge Gateway` must start with a lowercase",
        ),
        (&["--config", "edge", "--version", "latest", &good], 2, "gitfleet: --version: `latest` is reserved"),
        (&["--config", "edge", &missing], 2, &format!("gitfleet: {missing}: No such file")),
        (
            &["--config", "edge", "--repo", &not_a_repo.path().display().to_string(), &good],
            2,
            "not inside a Git working tree",
        ),
    ];
    for (args, code, expected) in cases {
        let done = import(repo.path(), args, None);
        assert_eq!(done.code, code, "{args:?}: {}", done.stderr);
        assert!(done.stderr.contains(expected), "{args:?}: expected {expected:?} in:\n{}", done.stderr);
        assert_eq!(state(&repo), before, "{args:?} changed the repository");
    }
    let broken_run = import(repo.path(), &["--config", "bad", &broken], None);
    assert!(broken_run.stderr.ends_with("nothing was written\n"), "{}", broken_run.stderr);

    // Git refuses the commit (no identity): the file is taken back out.
    let mut command = gitfleet();
    command
        .current_dir(repo.path())
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_COUNT", "1")
        .env("GIT_CONFIG_KEY_0", "user.useConfigOnly")
        .env("GIT_CONFIG_VALUE_0", "true")
        .env_remove("GIT_AUTHOR_NAME")
        .env_remove("GIT_AUTHOR_EMAIL")
        .env_remove("GIT_COMMITTER_NAME")
        .env_remove("GIT_COMMITTER_EMAIL")
        .env_remove("EMAIL")
        .args(["import", "--config", "edge", &good]);
    let done = run(&mut command, None);
    assert_eq!(done.code, 2, "{}", done.stderr);
    assert!(done.stderr.contains("`git commit"), "{}", done.stderr);
    assert_eq!(state(&repo), before, "a failed commit left something behind");
}
