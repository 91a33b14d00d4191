//! Restarts and faults a user can cause: nothing lost, nobody locked out.

use std::time::Duration;

use crate::common::{GitHttpServer, Server, bare_clone, example, http};
use crate::opamp::{converge, uid_text};

const WAIT: Duration = Duration::from_secs(15);

/// A repository served over smart HTTP, so that it can go out of reach and come back.
fn served_example() -> (tempfile::TempDir, std::path::PathBuf, GitHttpServer) {
    let (served, bare) = bare_clone(&example());
    let http = GitHttpServer::start(served.path());
    (served, bare, http)
}

/// Waits for `/readyz` to say ready: from the mirror when the repository is out of reach.
fn wait_until_ready(server: &Server) {
    let deadline = std::time::Instant::now() + WAIT;
    while server.get("/readyz").status != 200 {
        assert!(std::time::Instant::now() < deadline, "not ready; logs:\n{}", server.logs());
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Once the repository is back: a webhook makes the server fetch, and its problem goes.
fn catch_up(server: &Server) {
    let hook = http(server.web, "POST", "/hooks/git", &[], b"");
    assert!(hook.status < 300, "{}", hook.body);
    server.wait_for("/api/v1/repo", WAIT, "the problem gone", |r| r["problems"] == serde_json::json!([]));
}

#[test]
fn a_restart_with_the_repository_out_of_reach_serves_the_last_fetched_state() {
    let (_served, bare, remote) = served_example();
    let url = remote.url("fleet.git");
    let data = tempfile::tempdir().expect("temp dir");
    let flags = ["--poll-interval", "1h", "--no-status-branch"];
    let server = Server::start(&url, data.path(), &flags);
    let token = server.token("prod-gateway");
    let uid = [0x51; 16];
    drop(converge(&server, &token, uid, "gw-1", None));
    let before = server.json("/api/v1/fleets/prod-gateway");
    assert_eq!(before["tag"], "gateway/v1");
    let (opamp, web) = (server.opamp.to_string(), server.web.to_string());
    assert_eq!(server.stop(), Some(0));

    // The remote answers 404 for the repository from now on.
    let away = bare.with_extension("away");
    std::fs::rename(&bare, &away).expect("move the repository away");
    let server = Server::start_on(&opamp, &web, &url, data.path(), &flags);
    wait_until_ready(&server);
    let fleet = server.json("/api/v1/fleets/prod-gateway");
    assert_eq!(fleet["tag"], before["tag"]);
    assert_eq!(fleet["config_hash"], before["config_hash"]);
    assert_eq!(fleet["token"]["id"], before["token"]["id"], "the same token, not a new one");
    let repo = server.wait_for("/api/v1/repo", WAIT, "the repository reported out of reach", |r| {
        r["problems"].as_array().is_some_and(|p| p.iter().any(|p| p["severity"] == "error"))
    });
    assert!(repo["problems"].to_string().contains("fleet.git"), "{repo}");

    // The collector's token still works, and it is still in sync.
    let agent = converge(&server, &token, uid, "gw-1", None);
    let instance = server.json(&format!("/api/v1/instances/{}", uid_text(uid)));
    assert_eq!(instance["status"], "in_sync", "{instance}");
    drop(agent);

    // The remote comes back: a webhook (or the poll) catches up, and the problem goes.
    std::fs::rename(&away, &bare).expect("bring the repository back");
    catch_up(&server);
}

#[test]
fn until_its_fleets_are_loaded_the_server_asks_collectors_to_come_back_instead_of_refusing_them() {
    let (_served, bare, remote) = served_example();
    let url = remote.url("fleet.git");
    // Never fetched: there is nothing to start from, so the server stays unready.
    std::fs::rename(&bare, bare.with_extension("away")).expect("move the repository away");
    let data = tempfile::tempdir().expect("temp dir");
    let server = Server::start(&url, data.path(), &["--poll-interval", "1h", "--no-status-branch"]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(server.get("/readyz").status, 503);
    let headers = [("Authorization", "Bearer tk_00000000.0000"), ("Content-Type", "application/x-protobuf")];
    let answer = http(server.opamp, "POST", "/v1/opamp", &headers, b"");
    assert_eq!(answer.status, 503, "not 401 before any token is known: {}", answer.body);
    assert_eq!(answer.header("retry-after").as_deref(), Some("1"));
}

#[test]
fn a_store_that_refuses_writes_is_a_problem_until_it_takes_them_and_nothing_is_lost() {
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    let path = repo.path().display().to_string();
    let flags = ["--poll-interval", "1h", "--no-status-branch"];
    let server = Server::start(&path, data.path(), &flags);
    let token = server.token("prod-gateway");
    server.wait_for("/api/v1/repo", WAIT, "a quiet start", |r| r["problems"] == serde_json::json!([]));

    // Another process holds the database's write lock longer than gitfleet waits for it
    // (5 s): every write of instance changes fails while it does.
    let holder = rusqlite::Connection::open(data.path().join("state.db")).expect("open the database");
    holder.execute_batch("BEGIN IMMEDIATE").expect("take the write lock");
    let uid = [0x52; 16];
    let instance = format!("/api/v1/instances/{}", uid_text(uid));
    let agent = converge(&server, &token, uid, "gw-locked-out", None);
    let repo_state = server.wait_for("/api/v1/repo", Duration::from_secs(30), "the write problem", |r| {
        r["problems"].as_array().is_some_and(|p| !p.is_empty())
    });
    let problem = &repo_state["problems"][0];
    assert_eq!(problem["severity"], "error", "{repo_state}");
    assert!(problem["message"].as_str().is_some_and(|m| m.contains("cannot write instance changes")), "{repo_state}");
    let metrics = server.get("/metrics").body;
    let errors = metrics
        .lines()
        .find_map(|line| line.strip_prefix("gitfleet_store_write_errors_total "))
        .and_then(|value| value.parse::<u64>().ok());
    assert!(errors.is_some_and(|n| n >= 1), "{metrics}");
    // Memory keeps what the store has not taken: the effective config is still shown.
    let shown = server.json(&instance);
    assert_eq!(shown["status"], "in_sync");
    assert_eq!(shown["effective_config"]["body"], "# running on gw-locked-out\n", "{shown}");

    holder.execute_batch("ROLLBACK").expect("let go of the lock");
    drop(holder);
    server.wait_for("/api/v1/repo", Duration::from_secs(30), "the problem withdrawn", |r| {
        r["problems"] == serde_json::json!([])
    });
    drop(agent);
    assert_eq!(server.stop(), Some(0));

    // Everything the instance did while the store refused it was written once it could be.
    let server = Server::start(&path, data.path(), &flags);
    let after = server.wait_for(&instance, WAIT, "the restored instance", |i| i["status"] == "stale");
    assert_eq!(after["host"], "gw-locked-out");
    assert_eq!(after["effective_config"]["body"], "# running on gw-locked-out\n", "{after}");
    let events = after["events"].as_array().expect("events");
    assert!(events.iter().any(|e| e["to"] == "in_sync"), "the history written: {after}");
}

#[test]
fn an_agent_that_reports_megabytes_is_kept_to_kilobytes() {
    use prost::Message;
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    let server = Server::start(&repo.path().display().to_string(), data.path(), &["--poll-interval", "1h"]);
    let token = server.token("prod-gateway");
    let uid = [0x53; 16];
    // The host name goes into the description and the effective config: 3 MiB twice.
    let huge = "h".repeat(3 * 1024 * 1024);
    let message = crate::opamp::full_state(uid, 0, &huge);
    let authorization = format!("Bearer {token}");
    let headers = [("Authorization", authorization.as_str()), ("Content-Type", "application/x-protobuf")];
    for _ in 0..3 {
        let answer = http(server.opamp, "POST", "/v1/opamp", &headers, &message.encode_to_vec());
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    // The detail shows the effective config, kept up to 256 KiB.
    let detail = server.get(&format!("/api/v1/instances/{}", uid_text(uid)));
    assert!(detail.body.len() < 300 * 1024, "the API answer: {} bytes", detail.body.len());
    let instance: serde_json::Value = serde_json::from_str(&detail.body).expect("json");
    let host = instance["host"].as_str().expect("host");
    assert!(host.starts_with("hhhh") && host.ends_with(" more bytes not kept]"), "{}", &host[host.len() - 40..]);
    let list = server.get("/api/v1/instances");
    assert!(list.body.len() < 64 * 1024, "the list: {} bytes", list.body.len());
}

#[test]
fn a_token_that_makes_up_instance_ids_is_told_to_come_back_later() {
    use prost::Message;
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    let flags = ["--poll-interval", "1h", "--new-instances-burst", "3", "--new-instances-per-minute", "1"];
    let server = Server::start(&repo.path().display().to_string(), data.path(), &flags);
    let token = server.token("prod-gateway");
    let authorization = format!("Bearer {token}");
    let headers = [("Authorization", authorization.as_str()), ("Content-Type", "application/x-protobuf")];
    let post = |uid: u8| {
        let message = crate::opamp::full_state([uid; 16], 0, "made-up");
        http(server.opamp, "POST", "/v1/opamp", &headers, &message.encode_to_vec())
    };
    for uid in 1..=3 {
        assert_eq!(post(uid).status, 200, "within the burst");
    }
    let refused = post(4);
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert_eq!(refused.header("retry-after").as_deref(), Some("30"));
    assert!(refused.body.contains("too many new instances"), "{}", refused.body);
    assert_eq!(post(1).status, 200, "a known instance is heard");
    // Over WebSocket, the made-up id's connection is closed with "try again later".
    let mut agent = crate::common::OpampWs::connect(server.opamp, &token).expect("connects");
    agent.send(&crate::opamp::full_state([5; 16], 0, "made-up"));
    assert_eq!(agent.next().err().as_deref(), Some("close 1013"));

    let instances = server.json("/api/v1/instances");
    assert_eq!(instances["instances"].as_array().map(Vec::len), Some(3), "{instances}");
    let metrics = server.get("/metrics").body;
    assert!(metrics.contains("gitfleet_new_instances_refused_total 2"), "{metrics}");
}

#[test]
fn idle_sockets_count_against_the_limit_and_are_closed_when_they_say_nothing() {
    use std::io::Read;
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    let flags = ["--poll-interval", "1h", "--max-connections", "3"];
    let server = Server::start(&repo.path().display().to_string(), data.path(), &flags);
    let token = server.token("prod-gateway");

    // Three sockets that never send a byte take every slot.
    let idle: Vec<std::net::TcpStream> =
        (0..3).map(|_| std::net::TcpStream::connect(server.opamp).expect("connects")).collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut fourth = std::net::TcpStream::connect(server.opamp).expect("the socket is accepted");
    fourth.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut answer = String::new();
    fourth.read_to_string(&mut answer).expect("an answer, then the end");
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    assert!(answer.contains("Retry-After: 5"), "{answer}");
    assert_eq!(server.get("/healthz").status, 200, "the people port is not affected");

    // They are closed 10 s after saying nothing; then collectors get in again.
    for mut socket in idle {
        socket.set_read_timeout(Some(Duration::from_secs(15))).expect("timeout");
        let mut byte = [0u8; 1];
        let closed = socket.read(&mut byte);
        assert!(matches!(closed, Ok(0) | Err(_)), "closed by the server: {closed:?}");
    }
    std::thread::sleep(Duration::from_millis(200));
    drop(converge(&server, &token, [0x55; 16], "gw-after", None));
}

#[test]
fn a_request_head_sent_a_byte_at_a_time_is_cut_off_on_both_ports() {
    use std::io::{Read, Write};
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    let server = Server::start(&repo.path().display().to_string(), data.path(), &["--poll-interval", "1h"]);
    let head = b"POST /v1/opamp HTTP/1.1\r\nHost: gitfleet\r\nX-Slow: ";
    let mut slow: Vec<std::net::TcpStream> = [server.opamp, server.web]
        .into_iter()
        .map(|address| {
            let socket = std::net::TcpStream::connect(address).expect("connects");
            socket.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
            socket
        })
        .collect();
    // A byte a second keeps every socket far from silent, yet the head never ends: each is
    // closed when its head is due (10 s), long before the 30 s this waits.
    let mut open = vec![true; slow.len()];
    for second in 0..30 {
        for (socket, open) in slow.iter_mut().zip(open.iter_mut()).filter(|(_, open)| **open) {
            let byte = head.get(second).copied().unwrap_or(b'a');
            let mut buffer = [0u8; 512];
            let closed = socket.write_all(&[byte]).is_err()
                || matches!(socket.read(&mut buffer), Ok(0))
                || matches!(socket.read(&mut buffer), Err(error) if error.kind() != std::io::ErrorKind::WouldBlock && error.kind() != std::io::ErrorKind::TimedOut);
            *open = !closed;
        }
        if open.iter().all(|open| !open) {
            break;
        }
        std::thread::sleep(Duration::from_millis(950));
    }
    assert_eq!(open, vec![false, false], "the OpAMP port's and the web port's slow heads are closed");
    assert_eq!(server.get("/healthz").status, 200);
}

/// A loadgen process, killed when dropped.
struct Loadgen(std::process::Child);

impl Loadgen {
    fn start(server: &Server, token: &str, agents: usize, first: usize) -> Self {
        let child = crate::common::gitfleet()
            .args(["loadgen", "--url", &format!("ws://{}/v1/opamp", server.opamp), "--token", token])
            .args(["--agents", &agents.to_string(), "--first-agent", &first.to_string()])
            .args(["--connect-rate", "2000", "--duration", "60s"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("loadgen starts");
        Self(child)
    }
}

impl Drop for Loadgen {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_kill_while_collectors_arrive_loses_nothing_written_before_it() {
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    let path = repo.path().display().to_string();
    let flags = ["--poll-interval", "1h", "--status-interval", "1s"];
    let server = Server::start(&path, data.path(), &flags);
    let token = server.token("prod-gateway");
    let settled = Loadgen::start(&server, &token, 400, 0);
    server.wait_for("/api/v1/fleets/prod-gateway", Duration::from_secs(60), "400 in sync", |f| {
        f["counts"]["in_sync"] == 400
    });
    // Written: instances are flushed every 250 ms.
    std::thread::sleep(Duration::from_millis(1500));
    let fleets_before = server.json("/api/v1/fleets");
    let before: Vec<String> = server.json("/api/v1/instances")["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .map(|i| i["instance_uid"].as_str().expect("uid").to_owned())
        .collect();
    assert_eq!(before.len(), 400);

    // More collectors arrive, so that writes are under way, and the server is killed.
    let arriving = Loadgen::start(&server, &token, 2000, 400);
    server.wait_for("/api/v1/fleets/prod-gateway", Duration::from_secs(60), "arrivals", |f| {
        f["instances"].as_u64().is_some_and(|n| n > 600)
    });
    drop(server);
    drop((settled, arriving));

    let store = rusqlite::Connection::open(data.path().join("state.db")).expect("open the database");
    let check: String = store.query_row("PRAGMA integrity_check", [], |row| row.get(0)).expect("integrity check");
    assert_eq!(check, "ok");
    drop(store);

    let server = Server::start(&path, data.path(), &flags);
    let fleets_after = server.wait_for("/api/v1/fleets", WAIT, "the fleets", |f| {
        f["fleets"].as_array().is_some_and(|fleets| fleets.iter().all(|fleet| fleet["token"]["id"].is_string()))
    });
    for (old, new) in fleets_before["fleets"]
        .as_array()
        .expect("fleets")
        .iter()
        .zip(fleets_after["fleets"].as_array().expect("fleets"))
    {
        for field in ["name", "tag", "config_hash"] {
            assert_eq!(old[field], new[field], "{field} of {}", old["name"]);
        }
        assert_eq!(old["token"]["id"], new["token"]["id"], "the same token for {}", old["name"]);
    }
    let after = server.json("/api/v1/instances");
    let after: std::collections::HashMap<&str, &serde_json::Value> = after["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .map(|i| (i["instance_uid"].as_str().expect("uid"), i))
        .collect();
    assert!(after.len() >= 400, "{} instances", after.len());
    for uid in &before {
        let instance =
            after.get(uid.as_str()).unwrap_or_else(|| panic!("{uid} was written before the kill and is gone"));
        assert_eq!(instance["status"], "stale", "{instance}");
        assert!(instance["assigned_hash"].is_string(), "{instance}");
    }
    let sample = server.json(&format!("/api/v1/instances/{}", before[0]));
    let events = sample["events"].as_array().expect("events");
    assert!(events.iter().any(|e| e["to"] == "in_sync"), "its history: {sample}");
    // The status branch the server had pushed is intact.
    let log = repo.git(&["log", "--format=%s", "gitfleet/status"]);
    assert!(!log.trim().is_empty());
    assert!(repo.try_git(&["fsck", "--no-dangling"]).status.success());
}

#[test]
fn a_local_repository_missing_at_a_restart_is_served_from_what_was_fetched() {
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    let path = repo.path().display().to_string();
    let flags = ["--poll-interval", "1h", "--no-status-branch"];
    let server = Server::start(&path, data.path(), &flags);
    let token = server.token("prod-gateway");
    let before = server.json("/api/v1/fleets/prod-gateway");
    assert_eq!(server.stop(), Some(0));

    let away = repo.path().with_extension("away");
    std::fs::rename(repo.path(), &away).expect("move the repository away");
    let server = Server::start(&path, data.path(), &flags);
    wait_until_ready(&server);
    let fleet = server.json("/api/v1/fleets/prod-gateway");
    assert_eq!((&fleet["tag"], &fleet["token"]["id"]), (&before["tag"], &before["token"]["id"]));
    server.wait_for("/api/v1/repo", WAIT, "the repository reported missing", |r| {
        r["problems"].to_string().contains(&path)
    });
    drop(converge(&server, &token, [0x56; 16], "gw-1", None));

    std::fs::rename(&away, repo.path()).expect("bring the repository back");
    catch_up(&server);

    // A repository that was never fetched and is not there is still a mistake in the settings.
    let fresh = tempfile::tempdir().expect("temp dir");
    let missing = fresh.path().join("nowhere");
    let output = crate::common::gitfleet()
        .args(["serve", "--repo", &missing.display().to_string(), "--data-dir"])
        .arg(fresh.path().join("data"))
        .output()
        .expect("gitfleet runs");
    assert!(!output.status.success());
}
