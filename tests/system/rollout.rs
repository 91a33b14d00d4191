//! Progressive rollouts end to end: scripted agents against the real binary, driven by
//! commits to a real Git repository.

use std::time::Duration;

use serde_json::Value;

use crate::common::{GitRepo, OpampWs, Server, example, gitfleet};
use crate::opamp::{full_state, report, uid_text};
use crate::status::{FakeForge, status_log};

const WAIT: Duration = Duration::from_secs(20);
pub(crate) const APPLIED: i32 = 1;
const FAILED: i32 = 3;

/// The prod fleet file with `rollout` appended, at `version`.
pub(crate) fn prod_fleet(repo: &GitRepo, version: &str, rollout: &str) {
    let fleet = std::fs::read_to_string(repo.path().join("fleets/prod-gateway.toml")).expect("read");
    let fleet = fleet.split("\n[rollout]").next().expect("text").to_owned();
    let fleet = fleet
        .lines()
        .map(|line| if line.starts_with("version") { format!("version = \"{version}\"") } else { line.to_owned() })
        .collect::<Vec<_>>()
        .join("\n");
    repo.write("fleets/prod-gateway.toml", format!("{fleet}\n{rollout}"));
}

/// Publishes gateway/v2 (a smaller batch size).
pub(crate) fn publish_v2(repo: &GitRepo) {
    publish_smaller_batches(repo, "gateway/v2", 8192);
}

/// Publishes gateway/v3 (a smaller batch size again).
fn publish_v3(repo: &GitRepo) {
    publish_smaller_batches(repo, "gateway/v3", 4096);
}

/// Publishes `tag`: the gateway configuration with half the batch size it has (`size`).
fn publish_smaller_batches(repo: &GitRepo, tag: &str, size: u32) {
    let text = std::fs::read_to_string(repo.path().join("configs/gateway.yaml")).expect("read");
    repo.write(
        "configs/gateway.yaml",
        text.replace(&format!("send_batch_size: {size}"), &format!("send_batch_size: {}", size / 2)),
    );
    repo.commit("Smaller batches");
    repo.annotated_tag(tag, "Smaller batches");
}

/// A scripted agent that connects, takes what it is given and reports it applied.
pub(crate) struct Agent {
    pub(crate) uid: [u8; 16],
    ws: OpampWs,
    seq: u64,
}

impl Agent {
    /// An agent of prod.
    fn connect(server: &Server, n: u8, host: &str) -> (Self, Vec<u8>) {
        Self::connect_to(server, "prod-gateway", n, host)
    }

    pub(crate) fn connect_to(server: &Server, fleet: &str, n: u8, host: &str) -> (Self, Vec<u8>) {
        let uid = [n; 16];
        let mut ws = OpampWs::connect(server.opamp, &server.token(fleet)).expect("connects");
        ws.send(&full_state(uid, 0, host));
        let hash = ws.recv().remote_config.expect("a config").config_hash;
        let mut agent = Self { uid, ws, seq: 0 };
        agent.report(&hash, APPLIED, "");
        (agent, hash)
    }

    pub(crate) fn report(&mut self, hash: &[u8], status: i32, error: &str) {
        self.seq += 1;
        self.ws.send(&report(self.uid, self.seq, hash, status, error));
        self.ws.recv();
    }

    /// Waits for a pushed config, and reports it `status`.
    pub(crate) fn take_push(&mut self, status: i32, error: &str) -> Vec<u8> {
        let hash = self.next_push();
        self.report(&hash, status, error);
        hash
    }

    /// Waits for a pushed config and does not answer yet: the rollout waits on it.
    fn next_push(&mut self) -> Vec<u8> {
        self.ws.recv().remote_config.expect("a pushed config").config_hash
    }
}

fn instance(server: &Server, uid: [u8; 16]) -> Value {
    server.json(&format!("/api/v1/instances/{}", uid_text(uid)))
}

/// `(assigned_tag, assigned_because)` of an instance.
fn assigned(server: &Server, uid: [u8; 16]) -> (String, String) {
    let row = instance(server, uid);
    let row = if row["instance"].is_object() { row["instance"].clone() } else { row };
    (row["assigned_tag"].as_str().unwrap_or("").to_owned(), row["assigned_because"].as_str().unwrap_or("").to_owned())
}

/// Runs `gitfleet <args> --server <web>`: exit code, stdout, stderr.
fn client(server: &Server, args: &[&str]) -> (Option<i32>, String, String) {
    let output = gitfleet().args(args).args(["--server", &format!("http://{}", server.web)]).output().expect("runs");
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (output.status.code(), text(&output.stdout), text(&output.stderr))
}

fn rollout_state(server: &Server, state: &'static str) -> Value {
    server.wait_for("/api/v1/fleets/prod-gateway", WAIT, state, |f| f["rollout"]["state"] == state)
}

const CANARY_THEN_REST: &str = r#"
[rollout]
bake = "0s"

[[rollout.steps]]
name = "canary"
host = "gw-canary-*"
max = 1

[[rollout.steps]]
name = "rest"
hold = true
"#;

/// prod in steps (`CANARY_THEN_REST`) at v1, with a canary and `others` more agents in sync:
/// the repository, the data directory, the server, the canary, v1's hash and the others.
fn canary_and_others(others: u8) -> (GitRepo, tempfile::TempDir, Server, Agent, Vec<u8>, Vec<Agent>) {
    let repo = example();
    prod_fleet(&repo, "v1", CANARY_THEN_REST);
    repo.commit("Roll out prod in steps");
    let data = tempfile::tempdir().expect("temp dir");
    let server = start(&repo, data.path());
    let (canary, v1) = Agent::connect(&server, 1, "gw-canary-1");
    let others: Vec<Agent> = (2..=others + 1).map(|n| Agent::connect(&server, n, &format!("gw-{n}")).0).collect();
    let all = others.len() + 1;
    server.wait_for("/api/v1/fleets/prod-gateway", WAIT, "all in sync", |f| f["counts"]["in_sync"] == all);
    (repo, data, server, canary, v1, others)
}

fn start(repo: &GitRepo, data: &std::path::Path) -> Server {
    start_with(repo, data, &[])
}

fn start_with(repo: &GitRepo, data: &std::path::Path, extra: &[&str]) -> Server {
    let args: Vec<&str> = ["--poll-interval", "1h"].iter().chain(extra).copied().collect();
    let server = Server::start(&repo.path().display().to_string(), data, &args);
    server.wait_for("/api/v1/fleets/prod-gateway", WAIT, "prod's token", |f| f["token"]["id"].is_string());
    server
}

#[test]
fn a_failing_canary_halts_the_rollout_and_going_back_in_git_ends_it() {
    let (repo, _data, server, mut canary, v1, mut others) = canary_and_others(3);

    // The pull request: `check --server` shows where today's live instances would go.
    publish_v2(&repo);
    repo.git(&["checkout", "-q", "-b", "roll-out-v2"]);
    prod_fleet(&repo, "v2", CANARY_THEN_REST);
    repo.commit("Roll out gateway v2 to prod");
    let web = format!("http://{}", server.web);
    let path = repo.path().display().to_string();
    let output = gitfleet()
        .args(["check", "--repo", &path, "--base", "main", "--rev", "roll-out-v2", "--server", &web])
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}{}", String::from_utf8_lossy(&output.stderr));
    let expected = "  ~ fleet prod-gateway: gateway/v1 → gateway/v2\n      in 2 steps\n        \
        step 1 (canary, host=gw-canary-*, max 1): 1 instance now, all in sync\n        \
        step 2 (rest): 3 instances now, all in sync; waits for a commit that raises `release`\n";
    assert!(text.contains(expected), "{text}");
    let output = gitfleet()
        .args(["check", "--repo", &path, "--base", "main", "--rev", "roll-out-v2", "--server", "http://127.0.0.1:9"])
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(2), "a server that cannot be read is an error");
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .contains("cannot reach http://127.0.0.1:9/api/v1/fleets/prod-gateway/instances")
    );
    // Merged.
    repo.git(&["checkout", "-q", "main"]);
    repo.git(&["merge", "-q", "--ff-only", "roll-out-v2"]);
    let v2 = canary.take_push(FAILED, "exporter otlp: connection refused");
    assert_ne!(v2, v1);
    let fleet = rollout_state(&server, "halted");
    let rollout = &fleet["rollout"];
    assert_eq!((rollout["from"].as_str(), rollout["to"].as_str()), (Some("gateway/v1"), Some("gateway/v2")));
    assert_eq!((rollout["step"].as_u64(), rollout["steps_total"].as_u64()), (Some(1), Some(2)));
    let reason = rollout["reason"].as_str().expect("a reason");
    assert!(reason.starts_with("halted at step 1/2 (canary): 1 of 1 instances on gateway/v2 failed"), "{reason}");
    assert_eq!(rollout["steps"][0]["failed"], 1);
    assert_eq!(assigned(&server, canary.uid), ("gateway/v2".into(), "step 1".into()));
    for agent in &others {
        assert_eq!(assigned(&server, agent.uid), ("gateway/v1".into(), "held".into()), "the rest stay on v1");
    }
    // A pipeline waiting for the rollout learns at once that it halted.
    let (code, _, stderr) = client(&server, &["wait", "prod-gateway", "--for", "rollout-done", "--version", "v2"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("gitfleet wait: prod-gateway: halted at step 1/2 (canary)"), "{stderr}");
    let (code, table, _) = client(&server, &["status"]);
    assert_eq!(code, Some(0));
    let line = table.lines().find(|line| line.starts_with("prod-gateway")).expect("a line for prod");
    assert!(line.contains("halted at 1/2") && line.contains("0/4"), "none in sync on v2: {table}");
    assert!(table.contains("\nprod-gateway: halted at step 1/2 (canary): 1 of 1 instances"), "{table}");
    // The page: never green while halted.
    let overview = server.get("/").body;
    assert!(
        overview.contains("<span class=\"tag r-halted\" title=\"halted at step 1/2 (canary): 1 of 1"),
        "{overview}"
    );
    assert!(overview.contains(">0/4 new</span>"), "the in-sync column counts the new version: {overview}");
    let page = server.get("/fleets/prod-gateway").body;
    assert!(page.contains("<h2>Rollout</h2><p><span class=\"tag r-halted\">halted</span> <code>gateway/v1</code> → <code>gateway/v2</code>"), "{page}");
    assert!(page.contains("<li class=\"error\">halted at step 1/2 (canary)"), "{page}");
    assert!(
        page.contains("<tr aria-current=\"step\"><td>1 ▸ canary</td><td>host=gw-canary-*</td><td>1</td>"),
        "{page}"
    );
    let metrics = server.get("/metrics").body;
    for line in [
        "gitfleet_rollout_state{fleet=\"prod-gateway\",state=\"halted\"} 1",
        "gitfleet_rollout_state{fleet=\"prod-gateway\",state=\"running\"} 0",
        "gitfleet_rollout_step{fleet=\"prod-gateway\"} 1",
        "gitfleet_rollout_steps{fleet=\"prod-gateway\"} 2",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
    }

    // Going back to v1 in Git ends the rollout at once: the canary gets v1 again.
    prod_fleet(&repo, "v1", CANARY_THEN_REST);
    repo.commit("Back to v1");
    assert_eq!(canary.take_push(APPLIED, ""), v1);
    let fleet = rollout_state(&server, "reverted");
    assert!(fleet["rollout"]["reason"].as_str().expect("reason").contains("went back to gateway/v1 in Git"));
    server.wait_for("/api/v1/fleets/prod-gateway", WAIT, "all in sync on v1", |f| f["counts"]["in_sync"] == 4);
    assert_eq!(assigned(&server, others[0].uid), ("gateway/v1".into(), "fleet".into()));
    others.clear();
}

#[test]
fn a_held_step_survives_a_kill_and_is_released_by_a_commit() {
    let repo = example();
    prod_fleet(&repo, "v1", CANARY_THEN_REST);
    repo.commit("Roll out prod in steps");
    let data = tempfile::tempdir().expect("temp dir");
    let forge = FakeForge::start(false);
    let token_file = data.path().join("forge-token");
    std::fs::write(&token_file, "forge-s3cret\n").expect("write the token file");
    let forge_url = format!("http://{}/acme/fleet-config", forge.address);
    let token_path = token_file.display().to_string();
    let args =
        ["--status-interval", "1s", "--forge", "github", "--forge-url", &forge_url, "--forge-token-file", &token_path];
    let data_dir = data.path().join("data");
    let server = start_with(&repo, &data_dir, &args);
    let (mut canary, v1) = Agent::connect(&server, 1, "gw-canary-1");
    let others: Vec<Agent> = (2..=3).map(|n| Agent::connect(&server, n, &format!("gw-{n}")).0).collect();
    server.wait_for("/api/v1/fleets/prod-gateway", WAIT, "3 in sync", |f| f["counts"]["in_sync"] == 3);

    publish_v2(&repo);
    prod_fleet(&repo, "v2", CANARY_THEN_REST);
    let bump = repo.commit("Roll out gateway v2 to prod");
    let v2 = canary.take_push(APPLIED, "");
    let fleet = rollout_state(&server, "held");
    let rollout = &fleet["rollout"];
    assert_eq!(rollout["step"], 2);
    assert_eq!(rollout["reason"], "step 2/2 (rest) waits for a commit that raises `release` to 1");
    assert_eq!(
        (rollout["steps"][0]["instances"].as_u64(), rollout["steps"][0]["in_sync"].as_u64()),
        (Some(1), Some(1))
    );
    // Held is pending on the forge, and a commit on the status branch says where it stands.
    let held = "held before step 2/2 (rest), 1/3 at gateway/v2";
    let status_on = |commit: &str, state: &str, description: &str| {
        let path = format!("/api/v3/repos/acme/fleet-config/statuses/{commit}");
        let found = || {
            forge.received().into_iter().any(|r| {
                r.path == path
                    && r.body["context"] == "gitfleet/prod-gateway"
                    && r.body["state"] == state
                    && r.body["description"].as_str().is_some_and(|d| d.starts_with(description))
            })
        };
        let deadline = std::time::Instant::now() + WAIT;
        while !found() {
            assert!(
                std::time::Instant::now() < deadline,
                "no {state} status `{description}` on {commit}: {:#?}",
                forge.received()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    status_on(&bump, "pending", held);
    let deadline = std::time::Instant::now() + WAIT;
    while !status_log(&repo).iter().any(|message| message.lines().any(|line| line == format!("prod-gateway: {held}"))) {
        assert!(std::time::Instant::now() < deadline, "no status commit for the hold: {:#?}", status_log(&repo));
        std::thread::sleep(Duration::from_millis(50));
    }
    let readme = repo.git(&["show", "gitfleet/status:README.md"]);
    assert!(readme.contains(&format!("Rollout of gateway/v2: {held}.\n")), "{readme}");
    assert!(readme.contains("step 2/2 (rest) waits for a commit that raises \\`release\\` to 1"), "{readme}");

    let (code, _, stderr) = client(&server, &["wait", "prod-gateway", "--for", "rollout-done", "--timeout", "1s"]);
    assert_eq!(code, Some(2), "held: the wait times out");
    assert!(stderr.contains("gitfleet wait: timed out after 1s: prod-gateway: rollout held at step 2/2"), "{stderr}");

    // kill -9 while held; everything comes back from the store.
    drop((canary, others));
    drop(server);
    let server = start_with(&repo, &data_dir, &args);
    let fleet = rollout_state(&server, "held");
    assert_eq!(fleet["rollout"]["step"], 2);
    let (canary, canary_has) = Agent::connect(&server, 1, "gw-canary-1");
    assert_eq!(canary_has, v2, "the canary keeps v2");
    let (mut second, second_has) = Agent::connect(&server, 2, "gw-2");
    assert_eq!(second_has, v1, "the rest keep v1");
    // A late joiner of a held step gets the version before.
    let (mut late, late_has) = Agent::connect(&server, 9, "gw-9");
    assert_eq!(late_has, v1);
    assert_eq!(assigned(&server, late.uid), ("gateway/v1".into(), "held".into()));

    // The approval: a commit that raises `release`.
    prod_fleet(&repo, "v2", &CANARY_THEN_REST.replace("bake = \"0s\"", "bake = \"0s\"\nrelease = 1"));
    let release = repo.commit("Release the rest of prod to v2");
    assert_eq!(second.take_push(APPLIED, ""), v2);
    assert_eq!(late.take_push(APPLIED, ""), v2);
    let (code, stdout, stderr) =
        client(&server, &["wait", "prod-gateway", "--for", "rollout-done", "--version", "v2", "--timeout", "20s"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.starts_with("prod-gateway: the rollout of gateway/v2 is complete; 3 of 3 live instances"),
        "{stdout}"
    );
    let fleet = rollout_state(&server, "complete");
    assert!(fleet["rollout"]["reason"].is_null());
    // The release commit's status follows the rest of the rollout.
    status_on(&release, "success", "3/4 in sync");
    let (_, json, _) = client(&server, &["status", "prod-gateway", "-o", "json"]);
    let json: Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(json["fleets"][0]["rollout"], "complete");
    assert_eq!((json["fleets"][0]["in_sync"].as_u64(), json["fleets"][0]["stale"].as_u64()), (Some(3), Some(1)));
    server.wait_for("/api/v1/fleets/prod-gateway", WAIT, "in sync on v2", |f| {
        f["tag"] == "gateway/v2" && f["counts"]["in_sync"] == 3
    });
    assert_eq!(assigned(&server, canary.uid), ("gateway/v2".into(), "fleet".into()));
}

#[test]
fn batches_roll_back_on_failure_and_a_stale_instance_does_not_block() {
    let repo = example();
    let batches = "\n[rollout]\non_failure = \"rollback\"\n[rollout.batches]\ninitial = 1\nfactor = 2\n";
    prod_fleet(&repo, "v1", batches);
    repo.commit("Roll out prod in batches");
    let data = tempfile::tempdir().expect("temp dir");
    let server = start(&repo, data.path());
    let agents: Vec<Agent> = (1..=4).map(|n| Agent::connect(&server, n, &format!("gw-{n}")).0).collect();
    server.wait_for("/api/v1/fleets/prod-gateway", WAIT, "4 in sync", |f| f["counts"]["in_sync"] == 4);

    // A restart: three come back, the fourth stays away (stale until heard from).
    drop(agents);
    assert_eq!(server.stop(), Some(0));
    let server = start(&repo, data.path());
    let mut agents: Vec<Agent> = (1..=3).map(|n| Agent::connect(&server, n, &format!("gw-{n}")).0).collect();
    server.wait_for("/api/v1/fleets/prod-gateway", WAIT, "3 in sync, 1 stale", |f| {
        f["counts"]["in_sync"] == 3 && f["counts"]["stale"] == 1
    });
    publish_v2(&repo);
    let fleet = std::fs::read_to_string(repo.path().join("fleets/prod-gateway.toml")).expect("read");
    repo.write("fleets/prod-gateway.toml", fleet.replace("version = \"v1\"", "version = \"v2\""));
    repo.commit("Roll out gateway v2 to prod");
    let fleet = rollout_state(&server, "running");
    let plan: Vec<&str> = fleet["rollout"]["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| s["max"].as_str().unwrap_or("rest"))
        .collect();
    assert_eq!(plan, vec!["1", "rest"], "3 live instances: a batch of 1, then the rest");
    let first = &mut agents[0];
    let v2 = first.take_push(APPLIED, "");
    // The next batch: two instances, and the stale one counted as skipped.
    for agent in &mut agents[1..] {
        assert_eq!(agent.take_push(APPLIED, ""), v2);
    }
    let fleet = rollout_state(&server, "complete");
    assert_eq!(fleet["tag"], "gateway/v2");

    // The stale instance returns after its step passed: it gets v2.
    let (returned, has) = Agent::connect(&server, 4, "gw-4");
    assert_eq!(has, v2);
    assert_eq!(assigned(&server, returned.uid), ("gateway/v2".into(), "fleet".into()));

    // v3 fails in the first batch: everyone goes back to v2.
    publish_v3(&repo);
    let fleet = std::fs::read_to_string(repo.path().join("fleets/prod-gateway.toml")).expect("read");
    repo.write("fleets/prod-gateway.toml", fleet.replace("version = \"v2\"", "version = \"v3\""));
    repo.commit("Roll out gateway v3 to prod");
    let v3 = agents[0].take_push(FAILED, "processor batch: invalid size");
    assert_ne!(v3, v2);
    let fleet = rollout_state(&server, "rolled_back");
    let reason = fleet["rollout"]["reason"].as_str().expect("a reason");
    assert!(reason.starts_with("rolled back to gateway/v2 at step 1/3 (batch 1): 1 of 1"), "{reason}");
    assert_eq!(agents[0].take_push(APPLIED, ""), v2, "the failed instance goes back to v2");
    assert_eq!(assigned(&server, agents[1].uid), ("gateway/v2".into(), "rollback".into()));
    server.wait_for("/api/v1/fleets/prod-gateway/instances", WAIT, "the failed one back in sync", |list| {
        list["instances"].as_array().is_some_and(|rows| {
            rows.iter().any(|row| row["instance_uid"] == uid_text(agents[0].uid) && row["status"] == "in_sync")
        })
    });

    // The next version rolls out from what the instances run after the rollback: v2.
    publish_smaller_batches(&repo, "gateway/v4", 2048);
    let fleet = std::fs::read_to_string(repo.path().join("fleets/prod-gateway.toml")).expect("read");
    repo.write("fleets/prod-gateway.toml", fleet.replace("version = \"v3\"", "version = \"v4\""));
    repo.commit("Roll out gateway v4 to prod");
    // The first batch holds its push unanswered, so the rest are still held on v2.
    let v4 = agents[0].next_push();
    assert!(v4 != v3 && v4 != v2);
    let fleet =
        server.wait_for("/api/v1/fleets/prod-gateway", WAIT, "v4 rolling", |f| f["rollout"]["to"] == "gateway/v4");
    assert_eq!(fleet["rollout"]["from"], "gateway/v2", "{fleet:#}");
    assert_eq!(assigned(&server, agents[1].uid), ("gateway/v2".into(), "held".into()));
    agents[0].report(&v4, APPLIED, "");
    server.wait_for("/api/v1/fleets/prod-gateway/instances", WAIT, "the next batch once the first applied", |list| {
        list["instances"].as_array().is_some_and(|rows| {
            rows.iter().filter(|row| row["assigned_tag"] == "gateway/v4" && row["assigned_because"] == "step 2").count()
                == 2
        })
    });
}

#[test]
fn status_and_wait_say_clearly_what_they_cannot_read() {
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    let server = start(&repo, data.path());
    let (code, _, stderr) = client(&server, &["wait", "no-such-fleet", "--for", "in-sync"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("answered 404: no fleet named `no-such-fleet`"), "{stderr}");
    // No instance yet: nothing to wait for.
    let (code, stdout, _) = client(&server, &["wait", "prod-gateway", "--for", "in-sync"]);
    assert_eq!((code, stdout.as_str()), (Some(0), "prod-gateway: 0 of 0 live instances in sync with gateway/v1\n"));
    let web = server.web;
    drop(server);
    let output = gitfleet().args(["status", "--server", &format!("http://{web}")]).output().expect("runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.starts_with(&format!("gitfleet: cannot reach http://{web}/api/v1/fleets: ")), "{stderr}");
}

#[test]
fn a_version_published_mid_rollout_replaces_it_and_starts_over_from_the_version_before() {
    let (repo, _data, server, mut canary, v1, others) = canary_and_others(1);
    let rest = &others[0];
    publish_v2(&repo);
    prod_fleet(&repo, "v2", CANARY_THEN_REST);
    repo.commit("Roll out gateway v2 to prod");
    let v2 = canary.take_push(APPLIED, "");
    rollout_state(&server, "held");

    // v3 while v2 holds: the rollout of v2 is replaced, v3 starts over at the canary, and
    // the rest stay on v1, the version before both.
    publish_v3(&repo);
    prod_fleet(&repo, "v3", CANARY_THEN_REST);
    repo.commit("Roll out gateway v3 to prod");
    let v3 = canary.take_push(APPLIED, "");
    assert!(v3 != v2 && v3 != v1);
    let fleet = server.wait_for("/api/v1/fleets/prod-gateway", WAIT, "v3 held", |f| {
        f["rollout"]["to"] == "gateway/v3" && f["rollout"]["state"] == "held"
    });
    let rollout = &fleet["rollout"];
    assert_eq!((rollout["from"].as_str(), rollout["replaced"].as_str()), (Some("gateway/v1"), Some("gateway/v2")));
    assert_eq!(assigned(&server, canary.uid), ("gateway/v3".into(), "step 1".into()));
    assert_eq!(assigned(&server, rest.uid), ("gateway/v1".into(), "held".into()));
    let page = server.get("/fleets/prod-gateway").body;
    assert!(page.contains("it replaced the rollout of <code>gateway/v2</code>"), "{page}");
}
