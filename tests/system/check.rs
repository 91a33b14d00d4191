//! `gitfleet check` over repositories with real history, in each output format.

use expect_test::{expect, expect_file};

use crate::common::{GitRepo, gitfleet, gitfleet_unprivileged};

fn check(repo: &GitRepo, args: &[&str]) -> (i32, String, String) {
    let output = gitfleet().arg("check").arg("--repo").arg(repo.path()).args(args).output().expect("gitfleet runs");
    (
        output.status.code().expect("exit code"),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn example() -> GitRepo {
    let repo = GitRepo::new();
    repo.with_example();
    repo.annotated_tag("gateway/v1", "First gateway");
    repo.annotated_tag("node-agent/v1", "First node agent");
    repo.tag("sdk-agent/v1");
    repo
}

#[test]
fn the_example_repository_checks_clean() {
    let repo = example();
    let (code, stdout, stderr) = check(&repo, &[]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    expect![[r#"
        gitfleet check: commit 025e1c3d7a4d

        Fleets:
          legacy-edge              observe-only
          nodes                    node-agent/v1 (267a3288132f)
          prod-gateway             gateway/v1 (65d6d29695c2)
          sdk-agents               sdk-agent/v1 (0bd6ce16454f)
          staging-gateway          gateway/v1 (65d6d29695c2) [latest]

        Problems:
          (none)

        0 errors, 0 warnings
    "#]]
    .assert_eq(&stdout);
}

/// Every kind of bad input in one repository: each is a problem with its file and line,
/// and nothing crashes.
#[test]
fn a_broken_repository_reports_every_problem() {
    let repo = example();
    // A tag whose commit does not have the configuration yet.
    repo.write("configs/ghost.yaml", std::fs::read_to_string(repo.path().join("configs/gateway.yaml")).expect("read"));
    repo.write("fleets/ghost.toml", "config = \"ghost\"\nversion = \"v1\"\n");
    let with_ghost = repo.commit("ghost config");
    repo.git(&["tag", "ghost/v1", &format!("{with_ghost}~1")]);
    repo.tag("v1.0");
    repo.write("fleets/broken.toml", "config = \"gateway\nversion = \"v1\"\n");
    repo.write("fleets/typo.toml", "config = \"gateway\"\nverison = \"v1\"\n[token]\nexpire = \"1y\"\n");
    repo.write("fleets/missing.toml", "config = \"gateway\"\nversion = \"v9\"\n");
    repo.write("fleets/Bad Name.toml", "config = \"gateway\"\n");
    repo.write("configs/bad.yaml", "receivers:\n  otlp: {\n");
    repo.write(
        "configs/lint.yaml",
        "receivers:\n  otlp: {}\nprocessors:\n  batch: {}\n  memory_limiter: {}\nexporters:\n  debug: {}\nservice:\n  pipelines:\n    traces:\n      receivers: [otlp]\n      processors: [batch, memory_limiter]\n      exporters: [otlphttp]\n",
    );
    repo.write("configs/latin1.yaml", b"receivers:\n  caf\xe9: {}\n");
    repo.write("configs/huge.yaml", vec![b'#'; 5 * 1024 * 1024]);
    std::os::unix::fs::symlink("gateway.yaml", repo.path().join("configs/link.yaml")).expect("symlink");
    repo.commit("everything wrong at once");

    let (code, stdout, stderr) = check(&repo, &["--format", "json"]);
    assert_eq!(code, 1, "errors exit 1: {stdout}{stderr}");
    let plan: serde_json::Value = serde_json::from_str(&stdout).expect("JSON output");
    let problems: Vec<String> = plan["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .map(|p| {
            format!(
                "{}:{} {} {}",
                p["file"].as_str().unwrap_or("-"),
                p["line"],
                p["severity"].as_str().unwrap_or("?"),
                p["message"].as_str().unwrap_or("?")
            )
        })
        .collect();
    expect_file!["golden/broken_problems.txt"].assert_eq(&(problems.join("\n") + "\n"));
    assert_eq!(plan["errors"], 12);
    // Broken fleet files are fleets the server keeps (with no base, what it keeps is unknown).
    let fleets: Vec<String> = plan["fleets"]
        .as_array()
        .expect("fleets")
        .iter()
        .filter(|f| f["broken"] == true)
        .map(|f| f["name"].as_str().expect("name").to_owned())
        .collect();
    assert_eq!(fleets, vec!["broken", "typo"]);
    let (_, text, _) = check(&repo, &[]);
    assert!(text.contains("  typo                     broken: the server keeps its last good state\n"), "{text}");
}

fn plan_repo() -> (GitRepo, String) {
    let repo = example();
    repo.write("fleets/old.toml", "config = \"node-agent\"\nversion = \"v1\"\n");
    repo.write("fleets/wip.toml", "config = \"node-agent\"\nversion = \"v1\"\nbogus = 1\n");
    let base = repo.commit("base: a fleet to remove and a broken one");
    repo.write(
        "configs/gateway.yaml",
        std::fs::read_to_string(repo.path().join("configs/gateway.yaml"))
            .expect("read")
            .replace("send_batch_size: 8192", "send_batch_size: 4096"),
    );
    repo.commit("Smaller batches");
    repo.annotated_tag("gateway/v2", "Smaller batches");
    repo.write(
        "fleets/prod-gateway.toml",
        std::fs::read_to_string(repo.path().join("fleets/prod-gateway.toml"))
            .expect("read")
            .replace("version = \"v1\"", "version = \"v2\"")
            .replace("rotate  = 0", "rotate  = 1"),
    );
    repo.remove("fleets/old.toml");
    repo.remove("fleets/wip.toml");
    repo.write("fleets/canary.toml", "config = \"gateway\"\nversion = \"v3\"\n");
    // A typo breaks staging's file: the server keeps its last good state, so the plan must
    // not call it removed.
    let staging = std::fs::read_to_string(repo.path().join("fleets/staging-gateway.toml")).expect("read");
    repo.write("fleets/staging-gateway.toml", staging.replacen("version = ", "verison = ", 1));
    repo.commit("Roll out gateway v2 to prod, add canary, break staging");
    (repo, base)
}

#[test]
fn check_against_a_base_shows_the_plan_as_text() {
    let (repo, base) = plan_repo();
    let (code, stdout, _) = check(&repo, &["--base", &base]);
    assert_eq!(code, 1, "the new canary fleet points at a missing version");
    expect_file!["golden/plan.txt"].assert_eq(&stdout);
}

#[test]
fn check_against_a_base_shows_the_plan_as_markdown() {
    let (repo, base) = plan_repo();
    let (_, stdout, _) = check(&repo, &["--base", &base, "--format", "markdown"]);
    expect_file!["golden/plan.md"].assert_eq(&stdout);
}

#[test]
fn check_against_a_base_shows_the_plan_as_json() {
    let (repo, base) = plan_repo();
    let (_, stdout, _) = check(&repo, &["--base", &base, "--format", "json"]);
    let plan: serde_json::Value = serde_json::from_str(&stdout).expect("JSON output");
    assert_eq!(plan["added"], serde_json::json!(["canary"]));
    assert_eq!(plan["removed"], serde_json::json!(["old"]));
    assert_eq!(plan["broken"], serde_json::json!(["staging-gateway"]));
    let staging = plan["fleets"].as_array().expect("fleets").iter().find(|f| f["name"] == "staging-gateway");
    let staging = staging.expect("a broken fleet is still a fleet");
    assert_eq!((&staging["broken"], &staging["tag"]), (&serde_json::json!(true), &serde_json::json!("gateway/v2")));
    let rollouts = plan["rollouts"].as_array().expect("rollouts");
    assert_eq!(rollouts.len(), 1, "{rollouts:?}");
    assert_eq!(rollouts[0]["fleet"], "prod-gateway");
    assert_eq!(rollouts[0]["from"], "gateway/v1");
    assert_eq!(rollouts[0]["to"], "gateway/v2");
    assert!(
        rollouts[0]["diff"]
            .as_str()
            .expect("diff")
            .contains("-    send_batch_size: 8192\n+    send_batch_size: 4096\n")
    );
    assert_eq!(plan["settings_changed"][0]["changes"], serde_json::json!(["version: v1 → v2", "token.rotate: 0 → 1"]));
    assert_eq!(plan["new_problems"].as_array().map(Vec::len), Some(3));
    assert_eq!(plan["fixed_problems"][0]["file"], "fleets/wip.toml");
    assert_eq!(
        plan["fixed_problems"][0]["message"],
        "unknown key `bogus` (allowed: description, config, version, token, install, health, rollout)"
    );
}

#[test]
fn check_outside_a_repository_fails_clearly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = gitfleet().args(["check", "--repo"]).arg(dir.path()).output().expect("gitfleet runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.starts_with("gitfleet check: cannot open repository"), "{stderr}");
}

#[test]
fn a_directory_that_is_not_a_config_repository_is_an_error() {
    let repo = GitRepo::new();
    repo.write("src/main.rs", "fn main() {}\n");
    repo.write("README.md", "not a config repository\n");
    repo.commit("code");
    let (code, stdout, stderr) = check(&repo, &[]);
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert_eq!(stdout, "");
    assert_eq!(
        stderr.trim_end(),
        format!(
            "gitfleet check: {} is not a config repository: `HEAD` has no fleets/ and no configs/ directory (see the README for the layout)",
            repo.path().display()
        )
    );
    // One of the two is enough: a repository may start with an observe-only fleet.
    repo.write("fleets/edge.toml", "description = \"watch only\"\n");
    repo.commit("a fleet");
    let (code, stdout, stderr) = check(&repo, &[]);
    assert_eq!(code, 0, "{stdout}{stderr}");
}

#[test]
fn an_unreadable_repository_is_said_to_be_unreadable() {
    use std::os::unix::fs::PermissionsExt as _;
    let repo = example();
    let git_dir = repo.path().join(".git");
    let bin = tempfile::tempdir().expect("temp dir");
    std::fs::set_permissions(repo.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(&git_dir, std::fs::Permissions::from_mode(0o000)).expect("chmod");
    let check = gitfleet_unprivileged(bin.path()).arg("check").arg("--repo").arg(repo.path()).output();
    let serve = gitfleet_unprivileged(bin.path())
        .args(["serve", "--listen", "127.0.0.1:0", "--web-listen", "127.0.0.1:0", "--repo"])
        .arg(repo.path())
        .arg("--data-dir")
        .arg(bin.path().join("data"))
        .output();
    std::fs::set_permissions(&git_dir, std::fs::Permissions::from_mode(0o755)).expect("chmod back");
    let check = check.expect("gitfleet runs");
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert_eq!(check.status.code(), Some(2), "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        format!(
            "gitfleet check: cannot open repository {0}: {0}/.git: permission denied (the repository must be readable by this user)",
            repo.path().display()
        )
    );
    let serve = serve.expect("gitfleet runs");
    let stderr = String::from_utf8_lossy(&serve.stderr);
    assert_eq!(serve.status.code(), Some(2), "{stderr}");
    assert_eq!(
        stderr.lines().last(),
        Some(
            format!(
                "gitfleet: --repo {0}: {0}/.git: permission denied (the repository must be readable by this user)",
                repo.path().display()
            )
            .as_str()
        )
    );
}

/// The `Check` step of the README's GitHub Actions workflow: its script, as written there.
fn readme_check_step() -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README");
    let workflow = readme.split("# .github/workflows/gitfleet.yaml\n").nth(1).expect("the workflow in the README");
    let workflow = workflow.split("```").next().expect("the end of the workflow");
    let step = workflow.split("- name: Check\n").nth(1).expect("the Check step");
    let script = step.split("run: |\n").nth(1).expect("its script");
    script.lines().map(|line| line.strip_prefix("          ").unwrap_or(line)).collect::<Vec<_>>().join("\n") + "\n"
}

#[test]
fn the_readme_workflow_fails_the_job_on_errors_and_shows_the_plan() {
    let script = readme_check_step();
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_gitfleet")).parent().expect("the binary's directory");
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    // As GitHub runs `shell: bash`.
    let run = |repo: &GitRepo, base: &str| {
        let summary = repo.path().join("summary.md");
        let output = std::process::Command::new("bash")
            .args(["--noprofile", "--norc", "-eo", "pipefail", "-c", &script])
            .current_dir(repo.path())
            .env("PATH", &path)
            .env("BASE", base)
            .env("GITHUB_STEP_SUMMARY", &summary)
            .output()
            .expect("bash runs");
        let summary = std::fs::read_to_string(&summary).unwrap_or_default();
        (output.status.code(), String::from_utf8_lossy(&output.stdout).into_owned(), summary)
    };

    let (repo, base) = plan_repo();
    let (code, stdout, summary) = run(&repo, &base);
    assert_eq!(code, Some(1), "errors fail the job: {stdout}");
    assert!(summary.starts_with("### ❌ gitfleet check: 2 errors"), "{summary}");
    assert_eq!(stdout, summary, "the plan is in the log and in the summary");

    let clean = example();
    let (code, stdout, summary) = run(&clean, "HEAD");
    assert_eq!(code, Some(0), "{stdout}");
    assert!(summary.starts_with("### ✅ gitfleet check: 0 errors"), "{summary}");

    let (code, _, _) = run(&clean, "no-such-base");
    assert_eq!(code, Some(2), "a base that cannot be read fails the job too");
}
