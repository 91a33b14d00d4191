//! Status back to Git: the status branch after a real convergence, coalescing, a remote
//! that moves under us or goes away; commit statuses against a forge's documented API.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{GitRepo, Server, example};
use crate::opamp::{converge, full_state, report};

const WAIT: Duration = Duration::from_secs(20);

/// Polls `check` until it returns `Some`, or panics naming `what`.
fn eventually<T>(what: &str, server: &Server, check: impl Fn() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}; logs:\n{}", server.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(crate) fn status_log(repo: &GitRepo) -> Vec<String> {
    let output = repo.try_git(&["log", "--format=%B%x00", "gitfleet/status"]);
    if !output.status.success() {
        return Vec::new();
    }
    String::from_utf8_lossy(&output.stdout)
        .split('\0')
        .map(|message| message.trim().to_owned())
        .filter(|message| !message.is_empty())
        .collect()
}

#[test]
fn the_status_branch_records_a_convergence_in_few_commits() {
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    // An interval this long means: the first summary is committed at once, every later
    // change waits, and shutdown commits what waited.
    let server = Server::start(
        &repo.path().display().to_string(),
        data.path(),
        &["--poll-interval", "1h", "--status-interval", "1h", "--status-page-url", "https://fleet.example.com"],
    );
    let first = eventually("the first status commit", &server, || status_log(&repo).first().cloned());
    assert!(
        first.starts_with("5 fleets: legacy-edge, nodes, prod-gateway, sdk-agents, staging-gateway\n\n"),
        "{first}"
    );
    assert!(first.contains("prod-gateway: no instances connected at gateway/v1"), "{first}");
    assert!(first.contains("legacy-edge: 0 observed (observe only)"), "{first}");
    let branch_files = repo.git(&["ls-tree", "-r", "--name-only", "gitfleet/status"]);
    assert_eq!(
        branch_files.lines().collect::<Vec<_>>(),
        vec![
            "README.md",
            "fleets/legacy-edge.json",
            "fleets/nodes.json",
            "fleets/prod-gateway.json",
            "fleets/sdk-agents.json",
            "fleets/staging-gateway.json"
        ]
    );
    assert_eq!(repo.git(&["rev-list", "--count", "gitfleet/status", "^main"]).trim(), "1", "an orphan branch");

    // Eight changes (four joins, four reports), one of them a failure with a hostile error.
    let token = server.token("prod-gateway");
    let mut agents = Vec::new();
    for (index, host) in ["gw-1", "gw-2", "gw-3"].into_iter().enumerate() {
        agents.push(converge(&server, &token, [0x10 + index as u8; 16], host, None));
    }
    agents.push(converge(&server, &token, [0x20; 16], "gw-bad", Some("exporter \"otlp\" | <b>unknown</b>")));
    server.wait_for("/api/v1/fleets/prod-gateway", WAIT, "3 in sync, 1 failed", |f| {
        f["counts"]["in_sync"] == 3 && f["counts"]["failed"] == 1
    });
    // The statuses are recomputed every second; give them time to be seen by the writer.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(status_log(&repo).len(), 1, "changes within the interval wait for it");
    let metrics = server.get("/metrics").body;
    assert!(metrics.contains("gitfleet_status_commits_total 1\n"), "{metrics}");

    assert_eq!(server.stop(), Some(0));
    let log = status_log(&repo);
    assert_eq!(log.len(), 2, "{log:#?}");
    assert_eq!(log[0], "prod-gateway: 3/4 in sync, 1 failed at gateway/v1", "the change that waited, at shutdown");

    let file: serde_json::Value =
        serde_json::from_str(&repo.git(&["show", "gitfleet/status:fleets/prod-gateway.json"])).expect("JSON");
    let summary = &file["summary"];
    assert_eq!(summary["tag"], "gateway/v1");
    assert_eq!(summary["assigned_by"].as_str().map(str::len), Some(40), "{summary}");
    assert_eq!(summary["counts"]["in_sync"], 3);
    assert_eq!(summary["counts"]["failed"], 1);
    assert_eq!(summary["drift"], 0);
    assert_eq!(summary["failures"][0]["host"], "gw-bad");
    assert_eq!(summary["failures"][0]["error"], "exporter \"otlp\" | <b>unknown</b>");
    assert_eq!(file["verdict"], "failure");
    assert_eq!(file["description"], "3/4 in sync, 1 failed");
    let instances = file["instances"].as_array().expect("instances");
    assert_eq!(instances.len(), 4);
    let hosts: Vec<&str> = instances.iter().filter_map(|i| i["host"].as_str()).collect();
    assert_eq!(hosts, vec!["gw-1", "gw-2", "gw-3", "gw-bad"], "in instance_uid order");
    for instance in instances {
        assert!(instance["last_seen"].as_str().is_some_and(|t| t.ends_with('Z')), "{instance}");
        assert_eq!(instance["assigned_hash"], summary["config_hash"]);
        assert!(instance["status"] == "in_sync" || instance["status"] == "failed");
    }

    let readme = repo.git(&["show", "gitfleet/status:README.md"]);
    assert!(readme.contains("Live status: <https://fleet.example.com/>"), "{readme}");
    assert!(readme.contains("## [prod-gateway](https://fleet.example.com/fleets/prod-gateway)\n"), "{readme}");
    assert!(readme.contains("| gateway/v1 | 4 | 3 | 0 | 0 | 1 | 0 | 0 | 0 |"), "{readme}");
    assert!(readme.contains("| gw-bad | exporter \"otlp\" \\| &lt;b&gt;unknown&lt;/b&gt; |"), "{readme}");
    // The user's branch is untouched.
    assert_eq!(repo.git(&["rev-parse", "main"]), repo.head());
}

#[test]
fn a_moved_or_unreachable_remote_is_caught_up_with_later() {
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    let server = Server::start(
        &repo.path().display().to_string(),
        data.path(),
        &["--poll-interval", "1h", "--status-interval", "1s"],
    );
    eventually("the first status commit", &server, || status_log(&repo).first().cloned());

    // Someone else commits to the status branch: the next push is rejected, so gitfleet
    // fetches and puts its commit on top.
    let tree = repo.git(&["rev-parse", "gitfleet/status^{tree}"]);
    let theirs = repo.git(&["commit-tree", tree.trim(), "-p", "gitfleet/status", "-m", "A note from a person"]);
    repo.git(&["update-ref", "refs/heads/gitfleet/status", theirs.trim()]);
    let token = server.token("prod-gateway");
    let _first = converge(&server, &token, [0x31; 16], "gw-1", None);
    let log = eventually("a status commit on top of theirs", &server, || {
        let log = status_log(&repo);
        (log.first().map(String::as_str) == Some("prod-gateway: 1/1 in sync at gateway/v1")).then_some(log)
    });
    assert!(log.iter().any(|message| message == "A note from a person"), "{log:#?}");
    assert!(repo.try_git(&["merge-base", "--is-ancestor", theirs.trim(), "gitfleet/status"]).status.success());

    // The remote goes away: the server keeps serving, says why it cannot push, and keeps
    // the commit for later.
    let away = repo.path().with_extension("away");
    std::fs::rename(repo.path(), &away).expect("move the repository away");
    let _second = converge(&server, &token, [0x32; 16], "gw-2", None);
    let problems = server.wait_for("/api/v1/repo", WAIT, "a push problem", |r| {
        r["problems"].as_array().is_some_and(|p| {
            p.iter().any(|p| p["message"].as_str().is_some_and(|m| m.contains("cannot push the status branch")))
        })
    });
    let push_problem = problems["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .find(|p| p["message"].as_str().is_some_and(|m| m.contains("cannot push the status branch")))
        .expect("the push problem");
    assert_eq!(push_problem["severity"], "warning", "the server keeps working: a warning, not an error");
    let metrics = server.get("/metrics").body;
    let push_errors = metrics
        .lines()
        .find_map(|line| line.strip_prefix("gitfleet_git_push_errors_total "))
        .and_then(|value| value.parse::<u64>().ok());
    assert!(push_errors.is_some_and(|n| n >= 1), "{metrics}");
    assert_eq!(server.json("/api/v1/fleets/prod-gateway")["counts"]["in_sync"], 2, "still serving");

    std::fs::rename(&away, repo.path()).expect("bring the repository back");
    let log = eventually("the kept commit pushed", &server, || {
        let log = status_log(&repo);
        (log.first().map(String::as_str) == Some("prod-gateway: 2/2 in sync at gateway/v1")).then_some(log)
    });
    assert!(log.iter().any(|message| message == "A note from a person"), "{log:#?}");
    server.wait_for("/api/v1/repo", WAIT, "the push problem gone", |r| {
        r["problems"]
            .as_array()
            .is_some_and(|p| p.iter().all(|p| !p["message"].as_str().unwrap_or_default().contains("status branch")))
    });
    // gitfleet's own pushes are not changes to the desired state.
    assert_eq!(server.json("/api/v1/repo")["commit"].as_str(), Some(repo.head().as_str()));
}

/// A request the fake forge received.
#[derive(Clone, Debug)]
pub(crate) struct Received {
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: serde_json::Value,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(key, _)| key.eq_ignore_ascii_case(name)).map(|(_, value)| value.as_str())
    }
}

/// An HTTP server standing in for a forge's commit status API: records each request and
/// answers 201, or 503 to the first request for each status context when `fail_first`.
pub(crate) struct FakeForge {
    pub(crate) address: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
}

impl FakeForge {
    pub(crate) fn start(fail_first: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address");
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&received);
        std::thread::spawn(move || {
            let mut failed = std::collections::HashSet::new();
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).is_err() {
                    continue;
                }
                let mut headers = Vec::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).is_err() || line.trim().is_empty() {
                        break;
                    }
                    if let Some((key, value)) = line.trim().split_once(':') {
                        headers.push((key.trim().to_owned(), value.trim().to_owned()));
                    }
                }
                let length = headers
                    .iter()
                    .find(|(key, _)| key.eq_ignore_ascii_case("content-length"))
                    .and_then(|(_, value)| value.parse().ok())
                    .unwrap_or(0);
                let mut body = vec![0; length];
                let _ = reader.read_exact(&mut body);
                let mut parts = request_line.split_whitespace();
                let (method, path) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
                let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                let context = body.get("context").or_else(|| body.get("name")).map(ToString::to_string);
                let fail = fail_first && failed.insert(context);
                sink.lock().expect("lock").push(Received {
                    method: method.to_owned(),
                    path: path.to_owned(),
                    headers,
                    body,
                });
                let answer = if fail {
                    "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 11\r\nConnection: close\r\n\r\ntry later\r\n"
                } else {
                    "HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
                };
                let _ = stream.write_all(answer.as_bytes());
            }
        });
        Self { address, received }
    }

    pub(crate) fn received(&self) -> Vec<Received> {
        self.received.lock().expect("lock").clone()
    }
}

/// What one forge's documented API expects.
struct Contract {
    forge: &'static str,
    path_prefix: &'static str,
    auth: fn(&str) -> (String, String),
    state_key: &'static str,
    context_key: &'static str,
    states: [&'static str; 3],
}

#[test]
fn commit_statuses_follow_each_forges_api() {
    let contracts = [
        Contract {
            forge: "github",
            path_prefix: "/api/v3/repos/acme/fleet-config/statuses/",
            auth: |token| ("Authorization".into(), format!("Bearer {token}")),
            state_key: "state",
            context_key: "context",
            states: ["pending", "success", "failure"],
        },
        Contract {
            forge: "gitea",
            path_prefix: "/api/v1/repos/acme/fleet-config/statuses/",
            auth: |token| ("Authorization".into(), format!("token {token}")),
            state_key: "state",
            context_key: "context",
            states: ["pending", "success", "failure"],
        },
        Contract {
            forge: "gitlab",
            path_prefix: "/api/v4/projects/acme%2Ffleet-config/statuses/",
            auth: |token| ("PRIVATE-TOKEN".into(), token.to_owned()),
            state_key: "state",
            context_key: "name",
            states: ["running", "success", "failed"],
        },
    ];
    for contract in contracts {
        check_contract(&contract);
    }
}

fn check_contract(contract: &Contract) {
    let repo = example();
    // Statuses go on the commit that last changed the fleet's file, even at the first start
    // (when nothing is remembered), not on the branch head.
    let fleet_commit = repo.head();
    repo.write("README.md", "# Fleet config\n");
    repo.commit("docs");
    let data = tempfile::tempdir().expect("temp dir");
    let forge = FakeForge::start(true);
    let token_file = data.path().join("forge-token");
    std::fs::write(&token_file, "forge-s3cret\n").expect("write the token file");
    let forge_url = format!("http://{}/acme/fleet-config", forge.address);
    let token_path = token_file.display().to_string();
    let args = [
        "--poll-interval",
        "1h",
        "--status-interval",
        "1s",
        "--no-status-branch",
        "--forge",
        contract.forge,
        "--forge-url",
        &forge_url,
        "--forge-token-file",
        &token_path,
        "--status-page-url",
        "https://fleet.example.com/",
    ];
    let (repo_path, data_path) = (repo.path().display().to_string(), data.path().join("data"));
    let server = Server::start(&repo_path, &data_path, &args);
    let for_prod = |r: &Received| r.body[contract.context_key] == "gitfleet/prod-gateway";
    // The first post is answered 503 and retried.
    let posts = eventually("the retried pending status", &server, || {
        let posts: Vec<Received> = forge.received().into_iter().filter(for_prod).collect();
        (posts.len() >= 2).then_some(posts)
    });
    assert_eq!(posts[0].body, posts[1].body, "the same status again after the 503");
    let expected_path = format!("{}{fleet_commit}", contract.path_prefix);
    for post in &posts {
        assert_eq!((post.method.as_str(), post.path.as_str()), ("POST", expected_path.as_str()), "{}", contract.forge);
        let (name, value) = (contract.auth)("forge-s3cret");
        assert_eq!(post.header(&name), Some(value.as_str()), "{}: {:?}", contract.forge, post.headers);
        assert_eq!(post.header("content-type"), Some("application/json"));
        assert!(post.header("user-agent").is_some_and(|agent| agent.starts_with("gitfleet/")));
    }
    // No instance connected: nothing to wait for, so a required check does not block.
    assert_eq!(posts[1].body[contract.state_key], contract.states[1], "{}", contract.forge);
    assert_eq!(posts[1].body["description"], "no instances connected");
    assert_eq!(posts[1].body["target_url"], "https://fleet.example.com/fleets/prod-gateway");

    let token = server.token("prod-gateway");
    let _good = converge(&server, &token, [0x41; 16], "gw-1", None);
    let success = eventually("the success status", &server, || {
        forge
            .received()
            .into_iter()
            .filter(for_prod)
            .find(|r| r.body[contract.state_key] == contract.states[1] && r.body["description"] == "1/1 in sync")
    });
    assert_eq!(success.path, expected_path);
    let _bad = converge(&server, &token, [0x42; 16], "gw-2", Some("no such exporter"));
    let failure = eventually("the failure status", &server, || {
        forge.received().into_iter().filter(for_prod).find(|r| r.body[contract.state_key] == contract.states[2])
    });
    assert_eq!(failure.body["description"], "1/2 in sync, 1 failed");
    assert_eq!(failure.path, expected_path);

    // Posted only when it changes: the same state is never posted twice in a row (after
    // the retried 503).
    std::thread::sleep(Duration::from_millis(1500));
    let prod: Vec<Received> = forge.received().into_iter().filter(for_prod).skip(1).collect();
    for pair in prod.windows(2) {
        assert_ne!(pair[0].body, pair[1].body, "{}: {:#?}", contract.forge, prod);
    }
    // Observe-only fleets have nothing to show.
    assert!(forge.received().iter().all(|r| r.body[contract.context_key] != "gitfleet/legacy-edge"));
    assert!(!server.logs().contains("forge-s3cret"), "the forge token is never logged");
    server.stop();

    // After a restart, what was posted is not posted again: staging's status is the same,
    // prod's changed (its instances are stale until they reconnect).
    let count = |context: &str| forge.received().iter().filter(|r| r.body[contract.context_key] == context).count();
    let (staging_before, prod_before) = (count("gitfleet/staging-gateway"), count("gitfleet/prod-gateway"));
    assert!(staging_before >= 1);
    let server = Server::start(&repo_path, &data_path, &args);
    eventually("prod's changed status after the restart", &server, || {
        (count("gitfleet/prod-gateway") > prod_before).then_some(())
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(count("gitfleet/staging-gateway"), staging_before, "{}: not posted again", contract.forge);
    server.stop();
}

#[test]
fn a_restart_alone_makes_no_status_commit() {
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    let path = repo.path().display().to_string();
    let args = ["--poll-interval", "1h", "--status-interval", "4s"];
    let server = Server::start(&path, data.path(), &args);
    let token = server.token("prod-gateway");
    let uid = [0x71; 16];
    let agent = converge(&server, &token, uid, "gw-1", None);
    eventually("the instance in the status branch", &server, || {
        let shown = repo.try_git(&["show", "gitfleet/status:fleets/prod-gateway.json"]);
        let file: serde_json::Value = serde_json::from_slice(&shown.stdout).ok()?;
        (file["summary"]["counts"]["in_sync"] == 1).then_some(())
    });
    drop(agent);
    assert_eq!(server.stop(), Some(0));
    let commits = status_log(&repo).len();

    // The same collector comes back soon after the restart, still running its config: in
    // between, the restored instance is stale.
    let server = Server::start(&path, data.path(), &args);
    let fleet = server.wait_for("/api/v1/fleets/prod-gateway", WAIT, "the fleet", |f| f["config_hash"].is_string());
    let hash = hex::decode(fleet["config_hash"].as_str().expect("hash")).expect("hex");
    server.wait_for("/api/v1/fleets/prod-gateway", WAIT, "the instance stale", |f| f["counts"]["stale"] == 1);
    std::thread::sleep(Duration::from_millis(1500));
    let mut agent = crate::common::OpampWs::connect(server.opamp, &token).expect("connects");
    let mut hello = full_state(uid, 0, "gw-1");
    hello.remote_config_status = report(uid, 0, &hash, 1, "").remote_config_status;
    agent.send(&hello);
    agent.recv();
    let uid_text = crate::opamp::uid_text(uid);
    server.wait_for(&format!("/api/v1/instances/{uid_text}"), WAIT, "in sync again", |i| i["status"] == "in_sync");
    // Longer than the interval: had the restart's moment of "stale" been committed, it
    // would be there by now.
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(status_log(&repo).len(), commits, "{:#?}", status_log(&repo));
    server.stop();
}
