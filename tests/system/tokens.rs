//! Install tokens end to end: rotation with an overlap and the OpAMP connection-settings
//! offer, revocation closing live sessions, expiry, and secrets kept out of the logs.

use std::time::Duration;

use gitfleet::opamp::proto::{AgentToServer, ServerToAgent};
use prost::Message;

use crate::common::{GitRepo, OpampWs, Server, example, http};

const WAIT: Duration = Duration::from_secs(15);
/// A Supervisor with `accepts_opamp_connection_settings: true`.
const ACCEPTS_SETTINGS: u64 = 0x3847 | 0x100;
const SUPERVISOR: u64 = 0x3847;

fn hello(uid: [u8; 16], seq: u64, capabilities: u64) -> AgentToServer {
    AgentToServer {
        instance_uid: uid.to_vec(),
        sequence_num: seq,
        capabilities,
        agent_description: Some(Default::default()),
        health: Some(Default::default()),
        effective_config: Some(Default::default()),
        remote_config_status: Some(Default::default()),
        ..Default::default()
    }
}

fn set_token_policy(repo: &GitRepo, policy: &str) {
    let path = repo.path().join("fleets/prod-gateway.toml");
    let text = std::fs::read_to_string(&path).expect("read the fleet file");
    let start = text.find("[token]").expect("a [token] table");
    let end = text[start..].find("\n\n").map_or(text.len(), |i| start + i);
    repo.write("fleets/prod-gateway.toml", format!("{}[token]\n{policy}{}", &text[..start], &text[end..]));
}

fn post(server: &Server, token: &str, message: &AgentToServer) -> u16 {
    let authorization = format!("Bearer {token}");
    let headers = [("Authorization", authorization.as_str()), ("Content-Type", "application/x-protobuf")];
    http(server.opamp, "POST", "/v1/opamp", &headers, &message.encode_to_vec()).status
}

/// The next message that carries connection settings, skipping config pushes.
fn next_offer(agent: &mut OpampWs) -> ServerToAgent {
    loop {
        let message = agent.next().expect("an offer before anything else");
        if message.connection_settings.is_some() {
            return message;
        }
    }
}

fn id_of(token: &str) -> &str {
    token.split_once('.').expect("id.secret").0
}

fn assert_secrets_not_logged(server: &Server, tokens: &[&str]) {
    let logs = server.logs();
    for token in tokens {
        let secret = token.split_once('.').expect("id.secret").1;
        assert!(!logs.contains(secret), "a token secret appears in the logs:\n{logs}");
    }
}

#[test]
fn rotation_offers_the_new_token_over_opamp_and_honours_the_old_one_for_its_grace() {
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    let server = Server::start(&repo.path().display().to_string(), data.path(), &["--poll-interval", "1h"]);
    let old = server.token("prod-gateway");

    let (movable, fixed) = ([0x51; 16], [0x52; 16]);
    let mut accepts = OpampWs::connect(server.opamp, &old).expect("connects");
    accepts.send(&hello(movable, 0, ACCEPTS_SETTINGS));
    assert!(accepts.recv().connection_settings.is_none(), "nothing to offer on the current token");
    let mut cannot = OpampWs::connect(server.opamp, &old).expect("connects");
    cannot.send(&hello(fixed, 0, SUPERVISOR));
    cannot.recv();

    set_token_policy(&repo, "expires = \"1y\"\nrotate  = 1\ngrace   = \"4s\"\n");
    repo.commit("Rotate prod's install token");
    let new = server.new_token("prod-gateway", &old);
    assert_ne!(id_of(&new), id_of(&old));

    // The live session that accepts connection settings is offered the new token, with
    // everything the Supervisor rebuilds its connection from.
    let offer = next_offer(&mut accepts).connection_settings.expect("settings");
    assert_eq!(offer.hash.len(), 32);
    let opamp = offer.opamp.expect("OpAMP connection settings");
    assert_eq!(opamp.destination_endpoint, "ws://127.0.0.1:4320/v1/opamp", "the fleet's [install].endpoint");
    assert_eq!(opamp.heartbeat_interval_seconds, 30);
    let headers = opamp.headers.expect("the full header set").headers;
    assert_eq!(headers.len(), 1);
    assert_eq!(headers[0].key, "Authorization");
    assert_eq!(headers[0].value, format!("Bearer {new}"));

    // An instance that first shows up on the old token after the rotation (a second later,
    // as the rotation is timed to the second) may be whoever leaked it: no offer.
    std::thread::sleep(std::time::Duration::from_millis(1050));
    let mut newcomer = OpampWs::connect(server.opamp, &old).expect("the old token during its grace");
    newcomer.send(&hello([0x54; 16], 0, ACCEPTS_SETTINGS));
    assert!(newcomer.recv().connection_settings.is_none(), "no offer to an instance first seen after the rotation");
    drop(newcomer);

    // Both tokens work during the grace; the API tells which instances are on the old one.
    assert_eq!(post(&server, &old, &hello([0x53; 16], 0, SUPERVISOR)), 200, "the old token during its grace");
    let fleet = server.wait_for("/api/v1/fleets/prod-gateway", WAIT, "two tokens", |f| {
        f["tokens"].as_array().is_some_and(|t| t.len() == 2) && f["instances_on_old_tokens"] == 4
    });
    assert_eq!(fleet["token"]["id"], id_of(&new));
    assert_eq!(fleet["token"]["state"], "active");
    assert_eq!(fleet["tokens"][1]["id"], id_of(&old));
    assert_eq!(fleet["tokens"][1]["state"], "grace");
    assert!(fleet["tokens"][1]["retires_at"].is_string());
    assert_eq!(fleet["tokens"][1]["instances"], 4);

    // The Supervisor reconnects with the offered header: it is on the new token now.
    let mut moved = OpampWs::connect(server.opamp, &new).expect("the new token connects");
    moved.send(&hello(movable, 1, ACCEPTS_SETTINGS));
    assert!(moved.recv().connection_settings.is_none(), "no offer on the current token");
    let uid = gitfleet::opamp::codec::InstanceUid(movable).to_string();
    let instance = server.json(&format!("/api/v1/instances/{uid}"));
    assert_eq!(instance["token_id"], id_of(&new));
    assert_eq!(instance["token_current"], true);
    let fixed_uid = gitfleet::opamp::codec::InstanceUid(fixed).to_string();
    assert_eq!(server.json(&format!("/api/v1/instances/{fixed_uid}"))["token_current"], false);

    // When the grace ends, the old token is refused and its live session closed.
    assert_eq!(cannot.next().err().as_deref(), Some("close 1008"), "the old token's session is closed");
    assert_eq!(post(&server, &old, &hello([0x53; 16], 1, SUPERVISOR)), 401);
    assert!(OpampWs::connect(server.opamp, &old).is_err(), "a WebSocket upgrade with the old token");
    let fleet = server.json("/api/v1/fleets/prod-gateway");
    assert_eq!(fleet["tokens"][1]["state"], "retired");
    assert_eq!(post(&server, &new, &hello([0x53; 16], 2, SUPERVISOR)), 200);
    assert_secrets_not_logged(&server, &[&old, &new]);
    server.stop();
}

#[test]
fn revocation_closes_live_sessions_at_once_and_a_revoked_current_token_is_replaced() {
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    let server = Server::start(&repo.path().display().to_string(), data.path(), &["--poll-interval", "1h"]);
    let old = server.token("prod-gateway");
    let mut agent = OpampWs::connect(server.opamp, &old).expect("connects");
    agent.send(&hello([0x61; 16], 0, SUPERVISOR));
    agent.recv();

    set_token_policy(&repo, &format!("expires = \"1y\"\nrevoked = [\"{}\"]\n", id_of(&old)));
    repo.commit("Revoke prod's leaked install token");
    assert_eq!(agent.next().err().as_deref(), Some("close 1008"), "the session on the revoked token");
    assert_eq!(post(&server, &old, &hello([0x61; 16], 1, SUPERVISOR)), 401);

    let new = server.new_token("prod-gateway", &old);
    let fleet = server.json("/api/v1/fleets/prod-gateway");
    assert_eq!(fleet["token"]["id"], id_of(&new));
    assert_eq!(fleet["tokens"][1]["state"], "revoked");
    assert_eq!(post(&server, &new, &hello([0x61; 16], 1, SUPERVISOR)), 200);
    assert_secrets_not_logged(&server, &[&old, &new]);
    server.stop();
}

#[test]
fn an_expired_token_is_refused_its_session_closed_and_the_problem_reported() {
    let repo = example();
    set_token_policy(&repo, "expires = \"3s\"\n");
    repo.commit("Short-lived tokens");
    let data = tempfile::tempdir().expect("temp dir");
    let server = Server::start(&repo.path().display().to_string(), data.path(), &["--poll-interval", "1h"]);
    let token = server.token("prod-gateway");
    let mut agent = OpampWs::connect(server.opamp, &token).expect("connects before expiry");
    agent.send(&hello([0x71; 16], 0, SUPERVISOR));
    agent.recv();
    let fleet = server.json("/api/v1/fleets/prod-gateway");
    assert!(fleet["token"]["expires_at"].is_string());

    assert_eq!(agent.next().err().as_deref(), Some("close 1008"), "closed at expiry");
    assert_eq!(post(&server, &token, &hello([0x71; 16], 1, SUPERVISOR)), 401);
    assert_eq!(server.json("/api/v1/fleets/prod-gateway")["token"]["state"], "expired");
    let repo_state = server.json("/api/v1/repo");
    let problems = repo_state["problems"].as_array().expect("problems");
    assert!(
        problems.iter().any(|p| p["severity"] == "error"
            && p["file"] == "fleets/prod-gateway.toml"
            && p["message"].as_str().is_some_and(|m| m.contains("expired"))),
        "{problems:#?}"
    );
    assert_secrets_not_logged(&server, &[&token]);
    server.stop();
}

#[test]
fn a_removed_fleet_leaves_no_files_once_its_grace_ends_and_gets_a_new_token_when_it_comes_back() {
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    // A fleet that never resolved (its version is not published) has a token but no last
    // good state: it is not a removed fleet, and keeps its token across reconciles.
    repo.write("fleets/ghost.toml", "config = \"gateway\"\nversion = \"v9\"\n");
    repo.commit("A fleet waiting for gateway/v9");
    let server = Server::start(&repo.url(), data.path(), &["--poll-interval", "1s", "--removed-fleet-grace", "2s"]);
    let ghost = server.token("ghost");
    let old = server.token("nodes");
    let dir = data.path().join("install/nodes");
    // The install files follow the token a moment later (another task writes them).
    let deadline = std::time::Instant::now() + WAIT;
    while !dir.join("install.sh").is_file() {
        assert!(std::time::Instant::now() < deadline, "no install files for nodes: {}", server.logs());
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(dir.join("token").is_file());
    // The 404 of an unknown file lists the set as it is: prod-gateway dials ws://, no CA.
    let authorization = format!("Bearer {}", server.token("prod-gateway"));
    let unknown = http(server.opamp, "GET", "/v1/install/nope", &[("Authorization", &authorization)], b"");
    assert_eq!(unknown.status, 404);
    assert!(unknown.body.contains("supervisor.yaml") && !unknown.body.contains("ca.pem"), "{}", unknown.body);

    let text = std::fs::read_to_string(repo.path().join("fleets/nodes.toml")).expect("read");
    repo.remove("fleets/nodes.toml");
    repo.commit("Retire the nodes fleet");
    server.wait_for("/api/v1/fleets", WAIT, "the fleet removed", |f| {
        f["fleets"].as_array().is_some_and(|list| list.iter().all(|fleet| fleet["name"] != "nodes"))
    });
    let deadline = std::time::Instant::now() + WAIT;
    while dir.exists() {
        assert!(std::time::Instant::now() < deadline, "the install files of a removed fleet stay: {}", server.logs());
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(data.path().join("install/prod-gateway/token").is_file(), "other fleets keep theirs");
    // Its grace is over: its collectors are refused, and it is no longer a problem.
    assert_eq!(post(&server, &old, &hello([0x71; 16], 0, SUPERVISOR)), 401);
    let repo_status = server.json("/api/v1/repo");
    assert!(!repo_status["problems"].to_string().contains("was removed"), "{repo_status}");

    // Back under the same name: a new token, the old one stays out.
    repo.write("fleets/nodes.toml", text);
    repo.commit("Bring the nodes fleet back");
    let new = server.new_token("nodes", &old);
    let fleet = server.json("/api/v1/fleets/nodes");
    assert_eq!(fleet["token"]["id"].as_str(), new.split('.').next(), "{fleet}");
    let refused =
        http(server.opamp, "GET", "/v1/install/install.sh", &[("Authorization", &format!("Bearer {old}"))], b"");
    assert_eq!(refused.status, 401);
    assert!(server.logs().contains("reason=Returned"), "{}", server.logs());
    assert_eq!(server.token("ghost"), ghost, "a fleet that was never removed keeps its token");
    assert_eq!(server.logs().matches("reason=Returned").count(), 1, "{}", server.logs());
}

#[test]
fn the_collectors_of_a_removed_fleet_stay_connected_observe_only_and_across_a_restart_until_it_is_back() {
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    let flags = ["--poll-interval", "1h", "--no-status-branch"];
    let server = Server::start(&repo.path().display().to_string(), data.path(), &flags);
    let token = server.token("nodes");
    let uid = [0x81; 16];
    let mut agent = OpampWs::connect(server.opamp, &token).expect("connects");
    agent.send(&hello(uid, 0, SUPERVISOR));
    let assigned = agent.recv().remote_config.expect("the fleet's config");

    // A history rewrite that drops every fleet file.
    repo.git(&["rm", "-r", "--quiet", "fleets"]);
    let removal = repo.commit("Rewrite main without fleets/");
    let problems = server.wait_for("/api/v1/repo", WAIT, "the removal reported", |repo| {
        repo["problems"].to_string().contains("fleet `nodes` was removed")
    });
    let warning = problems["problems"]
        .as_array()
        .and_then(|list| list.iter().find(|p| p["message"].as_str().is_some_and(|m| m.contains("fleet `nodes`"))))
        .expect("a problem for nodes")
        .clone();
    assert_eq!(warning["severity"], "warning", "{warning}");
    assert!(warning["message"].as_str().is_some_and(|m| m.contains(&removal[..7])), "names the commit: {warning}");

    // The live session stays, and gets no new config; a new connection is let in too.
    agent.send(&AgentToServer {
        instance_uid: uid.to_vec(),
        sequence_num: 1,
        capabilities: SUPERVISOR,
        ..Default::default()
    });
    let reply = agent.recv();
    assert!(reply.remote_config.is_none(), "nothing pushed to a removed fleet: {reply:?}");
    assert_eq!(post(&server, &token, &hello([0x82; 16], 0, SUPERVISOR)), 200);
    let authorization = format!("Bearer {token}");
    let install = http(server.opamp, "GET", "/v1/install/install.sh", &[("Authorization", &authorization)], b"");
    assert_eq!(install.status, 410, "{}", install.body);
    assert!(install.body.contains("removed"), "{}", install.body);
    assert!(data.path().join("install/nodes/token").is_file(), "the token file stays for the grace");

    // Across a restart, the removal and its grace are remembered.
    drop(agent);
    server.stop();
    let server = Server::start(&repo.path().display().to_string(), data.path(), &flags);
    server.wait_for("/api/v1/repo", WAIT, "the removal still reported", |repo| {
        repo["problems"].to_string().contains("fleet `nodes` was removed")
    });
    let mut agent = OpampWs::connect(server.opamp, &token).expect("still let in after a restart");
    agent.send(&hello(uid, 0, SUPERVISOR));
    assert!(agent.recv().remote_config.is_none());

    // Undone: the fleet is back with the same token, and its collectors get their config.
    repo.git(&["revert", "--no-edit", "HEAD"]);
    server.wait_for("/api/v1/repo", WAIT, "the removal undone", |repo| {
        !repo["problems"].to_string().contains("was removed")
    });
    assert_eq!(server.token("nodes"), token, "the same token");
    agent.send(&hello(uid, 1, SUPERVISOR));
    let pushed = loop {
        match agent.next() {
            Ok(message) => match message.remote_config {
                Some(config) => break config,
                None => continue,
            },
            Err(other) => panic!("no config once the fleet is back: {other}; logs:\n{}", server.logs()),
        }
    };
    assert_eq!(pushed.config_hash, assigned.config_hash);
    assert!(!server.logs().contains("reason=Returned"), "{}", server.logs());
    server.stop();
}
