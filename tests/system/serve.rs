//! `gitfleet serve` end to end: each trigger, restarts, an unreachable remote, rewritten
//! history and bad settings, against the real binary and real repositories.

use std::time::Duration;

use serde_json::Value;

use crate::common::{GitRepo, Server, example, gitfleet, http};

const WAIT: Duration = Duration::from_secs(15);

/// Publishes gateway/v2 (smaller batches).
fn publish_gateway_v2(repo: &GitRepo) {
    let text = std::fs::read_to_string(repo.path().join("configs/gateway.yaml")).expect("read");
    repo.write("configs/gateway.yaml", text.replace("send_batch_size: 8192", "send_batch_size: 4096"));
    repo.commit("Smaller batches");
    repo.annotated_tag("gateway/v2", "Smaller batches");
}

fn fleet_tag(server: &Server, fleet: &str) -> Value {
    server.json(&format!("/api/v1/fleets/{fleet}"))["tag"].clone()
}

fn staging_on_v2(fleets: &Value) -> bool {
    fleets["tag"] == "gateway/v2"
}

#[test]
fn serves_the_api_with_the_documented_fields() {
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    let server = Server::start(&repo.url(), data.path(), &[]);
    let repo_state = server.wait_for("/api/v1/repo", WAIT, "first reconcile", |r| r["commit"].is_string());
    assert_eq!(repo_state["commit"], repo.head());
    assert_eq!(repo_state["branch"], "main");
    assert_eq!(repo_state["problems"], serde_json::json!([]));
    assert!(repo_state["reconciled_at"].as_str().is_some_and(|t| t.ends_with('Z')));

    let fleets = server.json("/api/v1/fleets");
    let names: Vec<&str> =
        fleets["fleets"].as_array().expect("fleets").iter().map(|f| f["name"].as_str().expect("name")).collect();
    assert_eq!(names, vec!["legacy-edge", "nodes", "prod-gateway", "sdk-agents", "staging-gateway"]);
    let prod = server.json("/api/v1/fleets/prod-gateway");
    for field in ["name", "config", "version", "config_hash", "instances", "counts", "drift", "token"] {
        assert!(prod.get(field).is_some(), "fleet object lacks `{field}`: {prod:#}");
    }
    assert_eq!(prod["version"], "v1");
    assert_eq!(prod["config_hash"].as_str().map(str::len), Some(64));
    assert_eq!(
        prod["counts"],
        serde_json::json!({"in_sync": 0, "pending": 0, "applying": 0, "failed": 0, "stale": 0, "observed": 0})
    );
    assert_eq!(server.json("/api/v1/fleets/legacy-edge")["observe_only"], true);
    assert_eq!(
        server.json("/api/v1/fleets/prod-gateway/instances"),
        serde_json::json!({"instances": [], "next_cursor": null})
    );

    let versions = server.json("/api/v1/configs/gateway/versions");
    let v1 = &versions["versions"][0];
    assert_eq!(
        (v1["tag"].as_str(), v1["note"].as_str(), v1["date"].as_str()),
        (Some("gateway/v1"), Some("First gateway"), Some("2026-01-02T03:04:05Z"))
    );
    assert_eq!(v1["config_hash"], prod["config_hash"]);
    let content = server.json("/api/v1/configs/gateway/versions/v1")["content"].as_str().expect("content").to_owned();
    assert!(content.contains("memory_limiter"));

    // The overview says what each number means: observe-only fleets count what they
    // observe, fleets on `latest` say so, and drift is defined where it is shown.
    let overview = server.get("/").body;
    let row = |fleet: &str| {
        let start = overview.find(&format!("<a href=\"/fleets/{fleet}\">")).expect("the fleet's row");
        overview[start..].split("</tr>").next().expect("a row").to_owned()
    };
    assert!(row("legacy-edge").contains("<td class=\"num\">0 observed</td>"), "{}", row("legacy-edge"));
    assert!(row("staging-gateway").contains(">latest</span>"), "{}", row("staging-gateway"));
    assert!(!row("prod-gateway").contains(">latest</span>"), "{}", row("prod-gateway"));
    assert!(overview.contains("<b>Drift</b>: instances whose served config is not their fleet's assigned config"));
    assert_eq!(server.get("/api/v1/fleets/nope").status, 404);
    assert_eq!(server.get("/api/v1/configs/nope/versions").status, 404);
    assert_eq!(server.get("/healthz").status, 200);
    assert_eq!(server.get("/readyz").status, 200);
    for path in ["/api/v1/fleets", "/api/v1/repo", "/api/v1/configs"] {
        assert_eq!(http(server.web, "POST", path, &[], b"{}").status, 405, "POST {path}");
        assert_eq!(http(server.web, "DELETE", path, &[], b"").status, 405, "DELETE {path}");
    }
}

#[test]
fn the_poll_interval_picks_up_a_push() {
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    let server = Server::start(&repo.url(), data.path(), &["--poll-interval", "1s"]);
    server.wait_for("/api/v1/fleets/staging-gateway", WAIT, "gateway/v1", |f| f["tag"] == "gateway/v1");
    publish_gateway_v2(&repo);
    server.wait_for("/api/v1/fleets/staging-gateway", WAIT, "staging to follow latest", staging_on_v2);
    assert_eq!(fleet_tag(&server, "prod-gateway"), "gateway/v1", "prod is pinned");
}

#[test]
fn the_filesystem_watch_sees_commits_to_a_local_repository() {
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    let path = repo.path().display().to_string();
    let server = Server::start(&path, data.path(), &["--poll-interval", "1h"]);
    server.wait_for("/api/v1/repo", WAIT, "first reconcile", |r| r["commit"].is_string());
    // Reading the repository must not itself look like a change: an idle server stays idle.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(server.json("/api/v1/repo")["fetches"], 1, "no fetch without a change");
    publish_gateway_v2(&repo);
    server.wait_for("/api/v1/fleets/staging-gateway", WAIT, "the filesystem watch to trigger", staging_on_v2);
}

#[test]
fn webhooks_trigger_a_fetch_only_when_signed() {
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    let secret = "hook-secret-for-tests";
    // From a file, as the README advises (a flag would show the secret in `ps`).
    let secret_file = data.path().join("webhook-secret");
    std::fs::write(&secret_file, format!("{secret}\n")).expect("write the secret file");
    let secret_path = secret_file.display().to_string();
    let args = ["--poll-interval", "1h", "--webhook-secret-file", &secret_path];
    let server = Server::start(&repo.url(), &data.path().join("data"), &args);
    server.wait_for("/api/v1/repo", WAIT, "first reconcile", |r| r["commit"].is_string());
    publish_gateway_v2(&repo);
    let body = br#"{"ref":"refs/heads/main"}"#;
    let signature = format!("sha256={}", gitfleet::git::webhook::sign(secret.as_bytes(), body));

    let refused: Vec<(&str, &str)> =
        vec![("X-Hub-Signature-256", "sha256=00"), ("X-Gitea-Signature", "beef"), ("X-Gitlab-Token", "wrong")];
    for (header, value) in refused {
        let response = http(server.web, "POST", "/hooks/git", &[(header, value)], body);
        assert_eq!(response.status, 401, "{header}: {}", response.body);
    }
    assert_eq!(http(server.web, "POST", "/hooks/git", &[], body).status, 401, "unsigned");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(fleet_tag(&server, "staging-gateway"), "gateway/v1", "refused hooks must not trigger a fetch");
    assert!(!server.logs().contains(secret), "the secret must never be logged");

    let accepted = http(
        server.web,
        "POST",
        "/hooks/git",
        &[("X-GitHub-Event", "push"), ("X-Hub-Signature-256", &signature)],
        body,
    );
    assert_eq!(accepted.status, 202, "{}", accepted.body);
    server.wait_for("/api/v1/fleets/staging-gateway", WAIT, "the GitHub hook to trigger", staging_on_v2);

    // Gitea signs the same way under its own header; GitLab sends the secret itself.
    repo.write(
        "fleets/prod-gateway.toml",
        std::fs::read_to_string(repo.path().join("fleets/prod-gateway.toml"))
            .expect("read")
            .replace("\"v1\"", "\"v2\""),
    );
    repo.commit("prod to v2");
    let gitea = gitfleet::git::webhook::sign(secret.as_bytes(), body);
    assert_eq!(http(server.web, "POST", "/hooks/git", &[("X-Gitea-Signature", &gitea)], body).status, 202);
    server.wait_for("/api/v1/fleets/prod-gateway", WAIT, "the Gitea hook to trigger", |f| f["tag"] == "gateway/v2");
    repo.write("fleets/nodes.toml", "config = \"node-agent\"\n");
    repo.commit("nodes observe-only");
    assert_eq!(http(server.web, "POST", "/hooks/git", &[("X-Gitlab-Token", secret)], body).status, 202);
    server.wait_for("/api/v1/fleets/nodes", WAIT, "the GitLab hook to trigger", |f| f["observe_only"] == true);
}

#[test]
fn a_restart_keeps_the_versions_first_seen_and_a_moved_tag_is_a_problem() {
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    let server = Server::start(&repo.url(), data.path(), &[]);
    let first = server.wait_for("/api/v1/fleets/prod-gateway", WAIT, "gateway/v1", |f| f["tag"] == "gateway/v1");
    let first_hash = first["config_hash"].clone();
    server.wait_for("/api/v1/repo", WAIT, "the status branch", |_| {
        repo.try_git(&["rev-parse", "--verify", "--quiet", "gitfleet/status"]).status.success()
    });
    assert_eq!(server.stop(), Some(0), "SIGTERM shuts down cleanly");

    // Move gateway/v1 to different content, as a careless force-push would.
    publish_gateway_v2(&repo);
    repo.git(&["tag", "--force", "--annotate", "gateway/v1", "--message", "moved"]);

    let server = Server::start(&repo.url(), data.path(), &[]);
    let state = server.wait_for("/api/v1/repo", WAIT, "reconcile after restart", |r| r["commit"] == repo.head());
    let problems = state["problems"].as_array().expect("problems");
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert_eq!(problems[0]["file"], "refs/tags/gateway/v1");
    assert!(
        problems[0]["message"].as_str().expect("message").contains("was moved to different content"),
        "{problems:#?}"
    );
    let prod = server.json("/api/v1/fleets/prod-gateway");
    assert_eq!(prod["config_hash"], first_hash, "the first content of gateway/v1 is still served");
    let v1 = server.json("/api/v1/configs/gateway/versions/v1");
    assert!(v1["content"].as_str().expect("content").contains("send_batch_size: 8192"));
    // What is served, as first seen (not the moved tag's note and date), marked as moved.
    let moved_to = repo.git(&["rev-parse", "gateway/v1^{commit}"]);
    assert_eq!(
        (v1["note"].as_str(), v1["date"].as_str(), v1["moved_to"].as_str()),
        (Some("First gateway"), Some("2026-01-02T03:04:05Z"), Some(moved_to.as_str()))
    );
    assert_ne!(v1["commit"].as_str(), Some(moved_to.as_str()));
    assert_eq!(v1["config_hash"], first_hash);
    let page = server.get("/configs/gateway").body;
    assert!(page.contains("moved to</span>") && page.contains(&moved_to[..12]), "{page}");
    assert!(!page.contains(">moved<"), "the moved tag's note is not shown: {page}");

    // `check` agrees, from the status branch: prod is served the first content.
    let output = gitfleet().args(["check", "--format", "json", "--repo"]).arg(repo.path()).output().expect("runs");
    let plan: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let prod = plan["fleets"].as_array().expect("fleets").iter().find(|f| f["name"] == "prod-gateway").cloned();
    assert_eq!(prod.expect("prod in the plan")["config_hash"], first_hash);
    let moved: Vec<&Value> =
        plan["problems"].as_array().expect("problems").iter().filter(|p| p["file"] == "refs/tags/gateway/v1").collect();
    assert_eq!(moved.len(), 1, "{plan:#}");
    assert!(moved[0]["message"].as_str().expect("message").contains("was moved to different content"));
}

#[test]
fn a_deleted_tag_never_moves_a_fleet_on_latest_backwards() {
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    let server = Server::start(&repo.url(), data.path(), &["--poll-interval", "1s"]);
    server.wait_for("/api/v1/fleets/staging-gateway", WAIT, "gateway/v1", |f| f["tag"] == "gateway/v1");
    publish_gateway_v2(&repo);
    let on_v2 = server.wait_for("/api/v1/fleets/staging-gateway", WAIT, "gateway/v2", staging_on_v2);

    repo.git(&["tag", "--delete", "gateway/v2"]);
    let state = server
        .wait_for("/api/v1/repo", WAIT, "the deleted tag", |r| !r["problems"].as_array().expect("problems").is_empty());
    let problems = state["problems"].as_array().expect("problems");
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert_eq!(
        (problems[0]["file"].as_str(), problems[0]["severity"].as_str()),
        (Some("refs/tags/gateway/v2"), Some("error"))
    );
    let message = problems[0]["message"].as_str().expect("message");
    assert!(message.contains("`staging-gateway` keeps running it"), "{message}");
    let staging = server.json("/api/v1/fleets/staging-gateway");
    assert_eq!((&staging["tag"], &staging["config_hash"]), (&on_v2["tag"], &on_v2["config_hash"]));
    let versions = server.json("/api/v1/configs/gateway/versions");
    assert_eq!(versions["versions"].as_array().map(Vec::len), Some(1));
    assert_eq!(versions["deleted"][0]["tag"], "gateway/v2");
    assert_eq!(server.json("/api/v1/configs/gateway/versions/v2")["deleted"], true);
    let page = server.get("/configs/gateway").body;
    assert!(page.contains("1 published version ·") && page.contains("1 deleted"), "{page}");
    assert!(page.contains(">deleted</span>"), "{page}");
    // Problems render their backticked names as code.
    let overview = server.get("/").body;
    assert!(overview.contains("tag <code>gateway/v2</code> was deleted after it was published; <code>staging-gateway</code> keeps running it"), "{overview}");

    // `check` agrees, from the status branch the server pushed into this repository.
    server.wait_for("/api/v1/repo", WAIT, "the status branch to record v2", |_| {
        let shown = repo.try_git(&["show", "gitfleet/status:fleets/staging-gateway.json"]);
        String::from_utf8_lossy(&shown.stdout).contains("\"tag\": \"gateway/v2\"")
    });
    let output = gitfleet().args(["check", "--format", "json", "--repo"]).arg(repo.path()).output().expect("runs");
    assert_eq!(output.status.code(), Some(1), "{}", String::from_utf8_lossy(&output.stderr));
    let plan: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let staging = plan["fleets"].as_array().expect("fleets").iter().find(|f| f["name"] == "staging-gateway").cloned();
    let staging = staging.expect("staging in the plan");
    assert_eq!((&staging["tag"], &staging["tag_deleted"]), (&on_v2["tag"], &Value::Bool(true)), "{staging}");
    assert_eq!(staging["config_hash"], on_v2["config_hash"]);
    assert_eq!(plan["problems"], state["problems"], "check and the API say the same");
    let text = gitfleet().args(["check", "--repo"]).arg(repo.path()).output().expect("runs");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("staging-gateway          keeps gateway/v2 on the server (its tag was deleted) [latest]"),
        "{text}"
    );

    // Across a restart too: the last good state remembers what the fleet runs.
    assert_eq!(server.stop(), Some(0));
    let server = Server::start(&repo.url(), data.path(), &["--poll-interval", "1s"]);
    let staging = server.wait_for("/api/v1/fleets/staging-gateway", WAIT, "the restart", |f| f["tag"].is_string());
    assert_eq!(staging["config_hash"], on_v2["config_hash"]);

    // Pinning v1 in the fleet file is the commit that rolls it back.
    let text = std::fs::read_to_string(repo.path().join("fleets/staging-gateway.toml")).expect("read");
    repo.write("fleets/staging-gateway.toml", text.replace("version = \"latest\"", "version = \"v1\""));
    repo.commit("Roll staging back to v1");
    server.wait_for("/api/v1/fleets/staging-gateway", WAIT, "the pinned rollback", |f| f["tag"] == "gateway/v1");
    let state = server.json("/api/v1/repo");
    assert_eq!(state["problems"][0]["severity"], "warning", "{state:#}");
}

#[test]
fn an_unreachable_remote_keeps_the_last_good_state_and_recovers() {
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    let server = Server::start(&repo.url(), data.path(), &["--poll-interval", "1s"]);
    server.wait_for("/api/v1/fleets/prod-gateway", WAIT, "gateway/v1", |f| f["tag"] == "gateway/v1");
    // Once the status branch is pushed, nothing more is pushed until an instance changes.
    server.wait_for("/api/v1/repo", WAIT, "the status branch pushed", |_| {
        repo.try_git(&["rev-parse", "--verify", "--quiet", "gitfleet/status"]).status.success()
    });

    let moved = repo.path().with_extension("away");
    std::fs::rename(repo.path(), &moved).expect("move the repository away");
    let state = server.wait_for("/api/v1/repo", WAIT, "the fetch problem", |r| {
        !r["problems"].as_array().expect("problems").is_empty()
    });
    let message = state["problems"][0]["message"].as_str().expect("message").to_owned();
    assert!(message.starts_with("cannot fetch file://"), "{message}");
    assert_eq!(state["problems"][0]["severity"], "error");
    assert_eq!(fleet_tag(&server, "prod-gateway"), "gateway/v1", "the last good state is still served");

    std::fs::rename(&moved, repo.path()).expect("move the repository back");
    server.wait_for("/api/v1/repo", Duration::from_secs(30), "recovery after backoff", |r| {
        r["problems"] == serde_json::json!([])
    });
}

#[test]
fn force_pushed_history_is_followed() {
    let repo = example();
    let first = repo.head();
    repo.write("fleets/extra.toml", "config = \"gateway\"\nversion = \"v1\"\n");
    repo.commit("extra fleet");
    let data = tempfile::tempdir().expect("temp dir");
    let server = Server::start(&repo.url(), data.path(), &["--poll-interval", "1s"]);
    server.wait_for("/api/v1/fleets", WAIT, "the extra fleet", |f| {
        f["fleets"].as_array().is_some_and(|list| list.len() == 6)
    });
    repo.git(&["reset", "--hard", "--quiet", &first]);
    let state = server.wait_for("/api/v1/repo", WAIT, "the rewritten branch", |r| r["commit"] == first.as_str());
    // The fleet the rewrite dropped is gone, and said to be (its collectors are not cut off
    // yet: tests/system/tokens.rs).
    let problems = state["problems"].as_array().expect("problems");
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert_eq!(problems[0]["severity"], "warning");
    assert!(
        problems[0]["message"].as_str().is_some_and(|m| m.starts_with("fleet `extra` was removed")),
        "{problems:#?}"
    );
    assert_eq!(server.get("/api/v1/fleets/extra").status, 404);
}

#[test]
fn a_deleted_tag_keeps_pinned_fleets_running() {
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    let server = Server::start(&repo.url(), data.path(), &["--poll-interval", "1s"]);
    let before = server.wait_for("/api/v1/fleets/prod-gateway", WAIT, "gateway/v1", |f| f["tag"] == "gateway/v1");
    repo.git(&["tag", "--delete", "gateway/v1"]);
    let state = server.wait_for("/api/v1/repo", WAIT, "the missing version", |r| {
        !r["problems"].as_array().expect("problems").is_empty()
    });
    let messages: Vec<&str> =
        state["problems"].as_array().expect("problems").iter().filter_map(|p| p["message"].as_str()).collect();
    assert!(
        messages.iter().any(|m| m.contains("fleet `prod-gateway`") && m.contains("it keeps running `gateway/v1`")),
        "{messages:#?}"
    );
    assert_eq!(server.json("/api/v1/fleets/prod-gateway")["config_hash"], before["config_hash"]);
}

#[test]
fn bad_settings_exit_with_one_clear_line_before_binding() {
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    let blocker = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = blocker.local_addr().expect("address").to_string();
    let not_a_repo = data.path().display().to_string();
    let path = repo.path().display().to_string();
    let token_file = data.path().join("forge-token").display().to_string();
    std::fs::write(&token_file, "t0ken\n").expect("write the token file");
    let empty = data.path().join("empty-token").display().to_string();
    std::fs::write(&empty, "\n").expect("write the empty token file");
    let missing = data.path().join("no-such-file").display().to_string();
    fn forge<'a>(repo: &'a str, url: &'a str, file: &'a str) -> Vec<&'a str> {
        vec!["--repo", repo, "--forge", "github", "--forge-url", url, "--forge-token-file", file]
    }
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--repo", &path, "--poll-interval", "soon"], "gitfleet: --poll-interval: `soon` is not a duration"),
        (vec!["--repo", &path, "--poll-interval", "10ms"], "gitfleet: --poll-interval: `10ms` is shorter than 1s"),
        (vec!["--repo", &not_a_repo], "gitfleet: --repo "),
        (vec!["--repo", &path, "--branch", "a..b"], "gitfleet: --branch `a..b` is not a valid branch name"),
        (vec!["--repo", &path, "--web-listen", "localhost"], "gitfleet: --web-listen `localhost` is not an address"),
        (vec!["--repo", &path, "--webhook-secret", ""], "gitfleet: --webhook-secret must not be empty"),
        (vec!["--repo", &path, "--webhook-secret-file", &missing], "gitfleet: --webhook-secret-file "),
        (vec!["--repo", &path, "--webhook-secret-file", &empty], "gitfleet: --webhook-secret-file "),
        (vec!["--repo", &path, "--web-listen", &taken], "gitfleet: cannot listen on"),
        (vec!["--repo", &path, "--status-interval", "0s"], "gitfleet: --status-interval: `0s` is shorter than 1s"),
        (vec!["--repo", &path, "--forget-after", "0s"], "gitfleet: --forget-after: `0s` is shorter than 1s"),
        (vec!["--repo", &path, "--forget-after", "forever"], "gitfleet: --forget-after: `forever` is not a duration"),
        (vec!["--repo", &path, "--status-branch", "main"], "gitfleet: --status-branch must differ from --branch"),
        (vec!["--repo", &path, "--status-branch", "a b"], "gitfleet: --status-branch `a b` is not a valid branch name"),
        (
            vec!["--repo", &path, "--status-page-url", "fleet.example.com"],
            "gitfleet: --status-page-url `fleet.example.com` is not",
        ),
        (
            forge(&path, "ftp://example.com/a/b", &token_file),
            "gitfleet: --forge-url `ftp://example.com/a/b` is not an http",
        ),
        (
            forge(&path, "https://github.com/acme", &token_file),
            "gitfleet: --forge-url `https://github.com/acme` does not name a repository",
        ),
        (forge(&path, "https://github.com/a/b", &missing), "gitfleet: --forge-token-file "),
        (vec!["--repo", &path, "--install-ca-file", &missing], "gitfleet: --install-ca-file "),
        (vec!["--repo", &path, "--install-ca-file", &token_file], "gitfleet: --install-ca-file "),
        (forge(&path, "https://github.com/a/b", &empty), "gitfleet: --forge-token-file "),
        (vec!["--repo", &path, "--listen", &taken], "gitfleet: cannot listen on"),
        // Not a PostgreSQL URL, said without the password in it.
        (vec!["--repo", &path, "--database", "mysql://u:s3cret@db/x"], "gitfleet: --database mysql://u@db/x: give a"),
    ];
    for (args, expected) in cases {
        let output = gitfleet()
            .arg("serve")
            .args(&args)
            .arg("--data-dir")
            .arg(data.path().join("d"))
            .output()
            .expect("gitfleet runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        let last = stderr.lines().last().unwrap_or_default();
        assert!(last.starts_with(expected), "{args:?}: expected {expected:?}, got:\n{stderr}");
        assert!(!data.path().join("d").exists(), "{args:?} wrote the data directory");
    }
    // A data directory that is a file, said so (not "File exists (os error 17)").
    let output =
        gitfleet().args(["serve", "--repo", &path, "--data-dir", &token_file]).output().expect("gitfleet runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert_eq!(
        stderr.lines().last(),
        Some(format!("gitfleet: --data-dir {token_file}: is a file, not a directory (give a directory; it is created if missing)").as_str())
    );
    // Every flag can come from the environment too.
    let output = gitfleet()
        .arg("serve")
        .env("GITFLEET_REPO", &path)
        .env("GITFLEET_POLL_INTERVAL", "never")
        .env("GITFLEET_DATA_DIR", data.path().join("d"))
        .output()
        .expect("gitfleet runs");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--poll-interval: `never` is not a duration"));
}

#[test]
fn a_branch_that_does_not_exist_stops_the_start_with_the_branches_that_do() {
    let repo = example();
    repo.git(&["branch", "release"]);
    let data = tempfile::tempdir().expect("temp dir");
    let output = gitfleet()
        .args(["serve", "--repo", &repo.url(), "--branch", "nosuch", "--listen", "127.0.0.1:0"])
        .args(["--web-listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.path().join("d"))
        .output()
        .expect("gitfleet runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert_eq!(
        last,
        format!("gitfleet: --branch `nosuch`: {} has no such branch (its branches: `main`, `release`)", repo.url())
    );
}

#[test]
fn an_empty_repository_is_waited_for_until_its_first_push() {
    let repo = GitRepo::new();
    let data = tempfile::tempdir().expect("temp dir");
    let server = Server::start(&repo.url(), data.path(), &["--poll-interval", "1s"]);
    let state = server.wait_for("/api/v1/repo", WAIT, "the missing branch problem", |r| {
        !r["problems"].as_array().expect("problems").is_empty()
    });
    let message = state["problems"][0]["message"].as_str().expect("message");
    assert!(message.starts_with("branch `main` not found in file://"), "{message}");
    repo.with_example();
    server.wait_for("/api/v1/repo", WAIT, "the first push", |r| r["commit"] == repo.head());
}

#[test]
fn a_branch_deleted_while_serving_is_a_problem_not_a_crash() {
    let repo = example();
    repo.git(&["branch", "release"]);
    let data = tempfile::tempdir().expect("temp dir");
    let server = Server::start(&repo.url(), data.path(), &["--branch", "release", "--poll-interval", "1s"]);
    server.wait_for("/api/v1/repo", WAIT, "the first read", |r| r["commit"] == repo.head());
    repo.git(&["branch", "--delete", "--force", "release"]);
    let state = server.wait_for("/api/v1/repo", WAIT, "the missing branch problem", |r| {
        !r["problems"].as_array().expect("problems").is_empty()
    });
    let message = state["problems"][0]["message"].as_str().expect("message");
    assert!(message.starts_with("branch `release` not found in file://"), "{message}");
    assert_eq!(server.json("/api/v1/fleets/prod-gateway")["tag"], "gateway/v1", "the last good state is served");
    repo.write("fleets/extra.toml", "config = \"gateway\"\nversion = \"v1\"\n");
    repo.commit("extra fleet");
    repo.git(&["branch", "release"]);
    let state = server.wait_for("/api/v1/repo", WAIT, "the branch to return", |r| r["commit"] == repo.head());
    assert_eq!(state["branch"], "release");
    assert_eq!(state["problems"], serde_json::json!([]));
}

#[test]
fn fetches_over_smart_http() {
    let work = example();
    let (served, bare) = crate::common::bare_clone(&work);
    // Let `git http-backend` accept pushes, so that the status branch is pushed over HTTP too.
    let allowed = crate::common::git_command(&bare).args(["config", "http.receivepack", "true"]).status();
    assert!(allowed.expect("git config runs").success());
    let http = crate::common::GitHttpServer::start(served.path());
    let data = tempfile::tempdir().expect("temp dir");
    let server = Server::start(&http.url("fleet.git"), data.path(), &["--poll-interval", "1s"]);
    let first = server
        .wait_for("/api/v1/fleets/staging-gateway", WAIT, "the first fetch over HTTP", |f| f["tag"] == "gateway/v1");
    assert!(first["config_hash"].is_string());

    // A push to the served repository: one new commit and one new tag.
    publish_gateway_v2(&work);
    let push = work.try_git(&["push", "--quiet", bare.to_str().expect("utf-8 path"), "main", "gateway/v2"]);
    assert!(push.status.success(), "{}", String::from_utf8_lossy(&push.stderr));
    server.wait_for("/api/v1/fleets/staging-gateway", WAIT, "the push to arrive over HTTP", staging_on_v2);
    let state = server.json("/api/v1/repo");
    assert_eq!(state["commit"], work.head());
    assert_eq!(state["problems"], serde_json::json!([]));
    let pushed = crate::common::git_command(&bare).args(["log", "-1", "--format=%s", "gitfleet/status"]).output();
    let subject = String::from_utf8_lossy(&pushed.expect("git log runs").stdout).into_owned();
    assert!(subject.contains(" fleets: "), "the status branch over smart HTTP: {subject}");
}

#[test]
fn each_fleet_gets_an_install_token_that_survives_a_restart() {
    use std::os::unix::fs::PermissionsExt;
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    let server = Server::start(&repo.url(), data.path(), &[]);
    server.wait_for("/api/v1/fleets", WAIT, "tokens for every fleet", |f| {
        f["fleets"].as_array().is_some_and(|fleets| fleets.iter().all(|fleet| fleet["token"]["id"].is_string()))
    });
    let mut secrets = Vec::new();
    for fleet in ["legacy-edge", "nodes", "prod-gateway", "sdk-agents", "staging-gateway"] {
        let path = data.path().join("install").join(fleet).join("token");
        // The token file is written just after the API shows the id: wait for it.
        let text = server.token(fleet);
        let mode = std::fs::metadata(&path).expect("metadata").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{fleet}: token file mode");
        let dir_mode = std::fs::metadata(path.parent().expect("dir")).expect("metadata").permissions().mode() & 0o777;
        assert_eq!(dir_mode, 0o700, "{fleet}: token directory mode");
        let (id, secret) = text.split_once('.').expect("id.secret");
        let api = server.json(&format!("/api/v1/fleets/{fleet}"));
        assert_eq!(api["token"]["id"], id, "{fleet}: the API shows the token id");
        assert!(!api.to_string().contains(secret), "{fleet}: the API never shows the secret");
        secrets.push(secret.to_owned());
    }
    let prod = server.json("/api/v1/fleets/prod-gateway");
    let issued = humantime::parse_rfc3339(prod["token"]["issued_at"].as_str().expect("issued_at")).expect("time");
    let expires = humantime::parse_rfc3339(prod["token"]["expires_at"].as_str().expect("expires_at")).expect("time");
    assert_eq!(
        expires.duration_since(issued).expect("later").as_secs(),
        365 * 86_400,
        "prod-gateway: expires = \"1y\""
    );
    assert_eq!(
        server.json("/api/v1/fleets/staging-gateway")["token"]["expires_at"],
        Value::Null,
        "no expiry by default"
    );

    let first_id = prod["token"]["id"].clone();
    let first_logs = server.logs();
    assert!(first_logs.contains("issued install token"), "{first_logs}");
    assert_eq!(server.stop(), Some(0));
    let server = Server::start(&repo.url(), data.path(), &[]);
    server.wait_for("/api/v1/fleets/prod-gateway", WAIT, "the same token after a restart", |f| {
        f["token"]["id"] == first_id
    });
    let logs = first_logs + &server.logs();
    for secret in &secrets {
        assert!(!logs.contains(secret.as_str()), "a token secret was logged");
    }
}
