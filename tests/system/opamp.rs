//! OpAMP end to end: scripted agents over WebSocket and plain HTTP against the real binary.

use std::time::{Duration, Instant};

use gitfleet::opamp::proto::{
    AgentConfigMap, AgentDescription, AgentToServer, AnyValue, ComponentHealth, EffectiveConfig, KeyValue,
    RemoteConfigStatus, ServerToAgent, any_value,
};
use prost::Message;

use crate::common::{GitRepo, OpampWs, Server, example, http};

const WAIT: Duration = Duration::from_secs(15);
const SUPERVISOR: u64 = 0x3847;

fn text(key: &str, value: &str) -> KeyValue {
    KeyValue { key: key.into(), value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.into())) }) }
}

pub(crate) fn full_state(uid: [u8; 16], seq: u64, host: &str) -> AgentToServer {
    AgentToServer {
        instance_uid: uid.to_vec(),
        sequence_num: seq,
        capabilities: SUPERVISOR,
        agent_description: Some(AgentDescription {
            identifying_attributes: vec![text("service.name", "otelcol-contrib"), text("service.version", "0.115.0")],
            non_identifying_attributes: vec![
                text("host.name", host),
                text("os.type", "linux"),
                text("host.arch", "amd64"),
            ],
        }),
        health: Some(ComponentHealth { healthy: true, status: "StatusOK".into(), ..Default::default() }),
        effective_config: Some(EffectiveConfig {
            config_map: Some(AgentConfigMap {
                config_map: [(
                    String::new(),
                    gitfleet::opamp::proto::AgentConfigFile {
                        body: format!("# running on {host}\n").into_bytes(),
                        content_type: String::new(),
                    },
                )]
                .into_iter()
                .collect(),
            }),
        }),
        remote_config_status: Some(RemoteConfigStatus::default()),
        ..Default::default()
    }
}

pub(crate) fn report(uid: [u8; 16], seq: u64, hash: &[u8], status: i32, error: &str) -> AgentToServer {
    AgentToServer {
        instance_uid: uid.to_vec(),
        sequence_num: seq,
        capabilities: SUPERVISOR,
        remote_config_status: Some(RemoteConfigStatus {
            last_remote_config_hash: hash.to_vec(),
            status,
            error_message: error.into(),
        }),
        ..Default::default()
    }
}

/// An agent of `fleet` that connects, takes its config and reports it applied (or failed
/// with `error`). Returns the open connection.
pub(crate) fn converge(server: &Server, token: &str, uid: [u8; 16], host: &str, error: Option<&str>) -> OpampWs {
    let mut agent = OpampWs::connect(server.opamp, token).expect("connects");
    agent.send(&full_state(uid, 0, host));
    let remote = agent.recv().remote_config.expect("the assigned config");
    match error {
        None => agent.send(&report(uid, 1, &remote.config_hash, 1, "")),
        Some(error) => agent.send(&report(uid, 1, &remote.config_hash, 3, error)),
    }
    agent.recv();
    agent
}

pub(crate) fn uid_text(uid: [u8; 16]) -> String {
    gitfleet::opamp::codec::InstanceUid(uid).to_string()
}

pub(crate) fn bump_prod_to_v2(repo: &GitRepo) {
    let text = std::fs::read_to_string(repo.path().join("configs/gateway.yaml")).expect("read");
    repo.write("configs/gateway.yaml", text.replace("send_batch_size: 8192", "send_batch_size: 4096"));
    repo.commit("Smaller batches");
    repo.annotated_tag("gateway/v2", "Smaller batches");
    let fleet = std::fs::read_to_string(repo.path().join("fleets/prod-gateway.toml")).expect("read");
    repo.write("fleets/prod-gateway.toml", fleet.replace("version = \"v1\"", "version = \"v2\""));
    repo.commit("Roll out gateway v2 to prod");
}

#[test]
fn a_websocket_agent_gets_its_config_reports_in_sync_and_gets_the_next_version_pushed() {
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    let path = repo.path().display().to_string();
    let server = Server::start(&path, data.path(), &["--poll-interval", "1h"]);
    let prod = server.wait_for("/api/v1/fleets/prod-gateway", WAIT, "prod's token", |f| f["token"]["id"].is_string());
    let uid = [0x42; 16];
    let mut agent = OpampWs::connect(server.opamp, &server.token("prod-gateway")).expect("connects");
    agent.send(&full_state(uid, 0, "gw-1"));
    let reply = agent.recv();
    assert_eq!(reply.instance_uid, uid.to_vec());
    assert_eq!(reply.capabilities, 0x27, "server capabilities in the first reply");
    assert_eq!(reply.flags, 0);
    let remote = reply.remote_config.expect("the assigned config");
    assert_eq!(hex::encode(&remote.config_hash), prod["config_hash"].as_str().expect("hash"));
    let file = &remote.config.expect("config map").config_map[""];
    assert_eq!(file.content_type, "text/yaml");
    assert!(String::from_utf8_lossy(&file.body).contains("send_batch_size: 8192"));

    agent.send(&report(uid, 1, &remote.config_hash, 2, ""));
    agent.recv();
    agent.send(&report(uid, 2, &remote.config_hash, 1, ""));
    agent.recv();
    let fleet = server.wait_for("/api/v1/fleets/prod-gateway", WAIT, "in sync", |f| f["counts"]["in_sync"] == 1);
    assert_eq!((fleet["instances"].as_u64(), fleet["drift"].as_u64()), (Some(1), Some(0)));
    let instances = server.json("/api/v1/fleets/prod-gateway/instances");
    let listed = &instances["instances"][0];
    assert_eq!(listed["instance_uid"], uid_text(uid));
    assert_eq!(
        (listed["status"].as_str(), listed["host"].as_str(), listed["agent_version"].as_str()),
        (Some("in_sync"), Some("gw-1"), Some("0.115.0"))
    );
    assert_eq!(listed["assigned_hash"], listed["served_hash"]);
    assert_eq!(listed["reported_hash"], listed["served_hash"]);

    // A push reaches the connected agent without it asking.
    let started = Instant::now();
    bump_prod_to_v2(&repo);
    let pushed = agent.recv();
    assert!(started.elapsed() < Duration::from_secs(5), "pushed, not waited for a heartbeat");
    assert_eq!(pushed.instance_uid, uid.to_vec());
    let next = pushed.remote_config.expect("the new version");
    assert_ne!(next.config_hash, remote.config_hash);
    assert!(String::from_utf8_lossy(&next.config.expect("map").config_map[""].body).contains("send_batch_size: 4096"));
    agent.send(&report(uid, 3, &next.config_hash, 1, ""));
    agent.recv();
    server.wait_for("/api/v1/fleets/prod-gateway", WAIT, "in sync at v2", |f| {
        f["tag"] == "gateway/v2" && f["counts"]["in_sync"] == 1
    });
    let detail = server.json(&format!("/api/v1/instances/{}", uid_text(uid)));
    let kinds: Vec<&str> =
        detail["events"].as_array().expect("events").iter().filter_map(|e| e["kind"].as_str()).collect();
    assert!(kinds.contains(&"assigned") && kinds.contains(&"status"), "{kinds:?}");
    assert_eq!(detail["description"]["os"], "linux");
    assert_eq!(detail["health"]["healthy"], true);
}

#[test]
fn failures_are_not_pushed_again_and_rollbacks_stay_failed() {
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    let server = Server::start(&repo.path().display().to_string(), data.path(), &["--poll-interval", "1h"]);
    server.wait_for("/api/v1/fleets/prod-gateway", WAIT, "prod's token", |f| f["token"]["id"].is_string());
    let uid = [0x43; 16];
    let mut agent = OpampWs::connect(server.opamp, &server.token("prod-gateway")).expect("connects");
    agent.send(&full_state(uid, 0, "gw-2"));
    let v1 = agent.recv().remote_config.expect("v1").config_hash;
    agent.send(&report(uid, 1, &v1, 1, ""));
    agent.recv();
    bump_prod_to_v2(&repo);
    let v2 = agent.recv().remote_config.expect("v2 pushed").config_hash;
    agent.send(&report(uid, 2, &v2, 3, "exporter otlphttp: invalid endpoint"));
    assert!(agent.recv().remote_config.is_none(), "a FAILED hash is not sent again");
    agent.send(&report(uid, 3, &v1, 1, ""));
    assert!(agent.recv().remote_config.is_none(), "nor after the rollback");
    let listed =
        server.wait_for(&format!("/api/v1/instances/{}", uid_text(uid)), WAIT, "failed", |i| i["status"] == "failed");
    assert_eq!(listed["error"], "exporter otlphttp: invalid endpoint");
    let kinds: Vec<&str> =
        listed["events"].as_array().expect("events").iter().filter_map(|e| e["kind"].as_str()).collect();
    assert!(kinds.contains(&"rolled_back"), "{kinds:?}");
    let fleet = server.json("/api/v1/fleets/prod-gateway");
    assert_eq!(fleet["counts"]["failed"], 1);
}

#[test]
fn plain_http_agents_with_gzip_and_errors() {
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    let server = Server::start(&repo.url(), data.path(), &[]);
    server.wait_for("/api/v1/fleets/sdk-agents", WAIT, "the token", |f| f["token"]["id"].is_string());
    let bearer = format!("Bearer {}", server.token("sdk-agents"));
    let protobuf = ("Content-Type", "application/x-protobuf");
    let uid = [0x44; 16];

    let body = full_state(uid, 0, "app-1").encode_to_vec();
    let gzipped = gitfleet::opamp::codec::gzip(&body);
    let response = http(
        server.opamp,
        "POST",
        "/v1/opamp",
        &[protobuf, ("Authorization", &bearer), ("Content-Encoding", "gzip"), ("Accept-Encoding", "gzip")],
        &gzipped,
    );
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(response.header("content-type").as_deref(), Some("application/x-protobuf"));
    let reply_bytes = if response.header("content-encoding").as_deref() == Some("gzip") {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&response.bytes[..]), &mut out).expect("gunzip");
        out
    } else {
        response.bytes.clone()
    };
    let reply = ServerToAgent::decode(reply_bytes.as_slice()).expect("a ServerToAgent");
    assert_eq!(reply.instance_uid, uid.to_vec());
    let remote = reply.remote_config.expect("the JSON config");
    assert_eq!(remote.config.expect("map").config_map[""].content_type, "application/json");

    let post = |headers: &[(&str, &str)], body: &[u8]| http(server.opamp, "POST", "/v1/opamp", headers, body);
    assert_eq!(post(&[protobuf], &body).status, 401, "no token");
    assert_eq!(post(&[protobuf, ("Authorization", "Bearer tk_00000000.0000")], &body).status, 401, "wrong token");
    let garbage = post(&[protobuf, ("Authorization", &bearer)], b"\x01garbage");
    assert_eq!(garbage.status, 400, "{}", garbage.body);
    let bad_gzip = post(&[protobuf, ("Authorization", &bearer), ("Content-Encoding", "gzip")], b"not gzip");
    assert_eq!(bad_gzip.status, 400);
    let oversized = post(&[protobuf, ("Authorization", &bearer)], &vec![0u8; 9 * 1024 * 1024]);
    assert_eq!(oversized.status, 413);
    let bomb = gitfleet::opamp::codec::gzip(&vec![0u8; 9 * 1024 * 1024]);
    assert_eq!(post(&[protobuf, ("Authorization", &bearer), ("Content-Encoding", "gzip")], &bomb).status, 413);

    // The agent reports applied on its next poll; the fleet counts it in sync.
    let applied = report(uid, 1, &remote.config_hash, 1, "").encode_to_vec();
    assert_eq!(post(&[protobuf, ("Authorization", &bearer)], &applied).status, 200);
    server.wait_for("/api/v1/fleets/sdk-agents", WAIT, "in sync", |f| f["counts"]["in_sync"] == 1);
}

#[test]
fn bad_input_closes_only_the_offending_connection() {
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    let server = Server::start(&repo.url(), data.path(), &[]);
    server.wait_for("/api/v1/fleets/nodes", WAIT, "the token", |f| f["token"]["id"].is_string());
    let token = server.token("nodes");
    let mut good = OpampWs::connect(server.opamp, &token).expect("connects");
    good.send(&full_state([0x50; 16], 0, "node-1"));
    good.recv();

    match OpampWs::connect(server.opamp, "tk_00000000.00") {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 401),
        other => panic!("a bad token must get 401, got {:?}", other.map(|_| ())),
    }
    let mut text = OpampWs::connect(server.opamp, &token).expect("connects");
    text.socket.send(tungstenite::Message::Text("hello".into())).expect("send");
    assert_eq!(text.next().err().as_deref(), Some("close 1003"));
    let mut garbage = OpampWs::connect(server.opamp, &token).expect("connects");
    garbage.socket.send(tungstenite::Message::Binary(b"\x01garbage".to_vec().into())).expect("send");
    assert_eq!(garbage.next().err().as_deref(), Some("close 1007"));
    let mut truncated = OpampWs::connect(server.opamp, &token).expect("connects");
    let whole = full_state([0x51; 16], 0, "x").encode_to_vec();
    truncated.socket.send(tungstenite::Message::Binary(whole[..whole.len() / 2].to_vec().into())).expect("send");
    assert_eq!(truncated.next().err().as_deref(), Some("close 1007"));
    let mut huge = OpampWs::connect(server.opamp, &token).expect("connects");
    let _ = huge.socket.send(tungstenite::Message::Binary(vec![0u8; 9 * 1024 * 1024].into()));
    let outcome = huge.next().err().unwrap_or_default();
    assert!(outcome == "close 1009" || outcome.starts_with("error"), "oversized: {outcome}");
    let mut wrong_length = OpampWs::connect(server.opamp, &token).expect("connects");
    wrong_length.send(&AgentToServer { instance_uid: vec![1, 2, 3], ..full_state([0; 16], 0, "odd") });
    let reply = wrong_length.recv();
    assert_eq!(reply.instance_uid, vec![1, 2, 3]);
    assert_eq!(reply.agent_identification.map(|a| a.new_instance_uid.len()), Some(16), "a new id for a bad one");

    // The well-behaved agent never noticed.
    good.send(&full_state([0x50; 16], 1, "node-1"));
    let reply = good.recv();
    assert_eq!(reply.instance_uid, vec![0x50; 16]);
}

#[test]
fn a_restart_keeps_instances_which_come_back_stale_until_heard_from() {
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    let path = repo.path().display().to_string();
    let server = Server::start(&path, data.path(), &["--poll-interval", "1h"]);
    server.wait_for("/api/v1/fleets/prod-gateway", WAIT, "prod's token", |f| f["token"]["id"].is_string());
    let uid = [0x45; 16];
    let token = server.token("prod-gateway");
    let mut agent = OpampWs::connect(server.opamp, &token).expect("connects");
    agent.send(&full_state(uid, 0, "gw-restart"));
    let hash = agent.recv().remote_config.expect("config").config_hash;
    agent.send(&report(uid, 1, &hash, 1, ""));
    agent.recv();
    let before =
        server.wait_for(&format!("/api/v1/instances/{}", uid_text(uid)), WAIT, "in sync", |i| i["status"] == "in_sync");
    drop(agent);
    assert_eq!(server.stop(), Some(0));

    let server = Server::start(&path, data.path(), &["--poll-interval", "1h"]);
    let after = server.wait_for(&format!("/api/v1/instances/{}", uid_text(uid)), WAIT, "the restored instance", |i| {
        i["status"] == "stale" && i["assigned_hash"].is_string()
    });
    for field in ["host", "os", "served_hash", "reported_hash", "assigned_hash", "first_seen", "effective_config"] {
        assert_eq!(after[field], before[field], "{field} survives the restart");
    }
    assert_eq!(after["effective_config"]["body"], "# running on gw-restart\n", "read back from the store");
    let (before_events, after_events) =
        (before["events"].as_array().expect("events"), after["events"].as_array().expect("events"));
    assert_eq!(&after_events[1..], &before_events[..], "the history survives, newest first");
    assert_eq!((after_events[0]["from"].as_str(), after_events[0]["to"].as_str()), (Some("in_sync"), Some("stale")));
    assert_eq!(server.json("/api/v1/fleets/prod-gateway")["counts"]["stale"], 1);

    // The agent reconnects with compressed status, as opamp-go does since #512.
    let mut agent = OpampWs::connect(server.opamp, &token).expect("reconnects");
    agent.send(&AgentToServer {
        instance_uid: uid.to_vec(),
        sequence_num: 2,
        capabilities: SUPERVISOR,
        ..Default::default()
    });
    let reply = agent.recv();
    assert_eq!(reply.flags & 1, 1, "ReportFullState after the restart");
    assert!(reply.remote_config.is_none(), "it already runs the assigned hash");
    server
        .wait_for(&format!("/api/v1/instances/{}", uid_text(uid)), WAIT, "in sync again", |i| i["status"] == "in_sync");
}

/// The ids of every instance the server knows, sorted.
fn known_uids(server: &Server) -> Vec<String> {
    let instances = server.json("/api/v1/instances");
    let mut uids: Vec<String> = instances["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .map(|i| i["instance_uid"].as_str().expect("an id").to_owned())
        .collect();
    uids.sort();
    uids
}

#[test]
fn silent_instances_are_forgotten_and_stay_forgotten_after_a_restart() {
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    let path = repo.path().display().to_string();
    let server = Server::start(&path, data.path(), &["--poll-interval", "1h", "--forget-after", "2s"]);
    let token = server.token("prod-gateway");
    let (gone, polled, quiet) = ([0xa1; 16], [0xa2; 16], [0xa3; 16]);
    // One that leaves, one that polls once over HTTP, one that stays connected and says nothing.
    let mut leaving = OpampWs::connect(server.opamp, &token).expect("connects");
    leaving.send(&full_state(gone, 0, "leaving"));
    leaving.recv();
    drop(leaving);
    let bearer = format!("Bearer {token}");
    let headers = [("Content-Type", "application/x-protobuf"), ("Authorization", bearer.as_str())];
    let polled_once =
        http(server.opamp, "POST", "/v1/opamp", &headers, &full_state(polled, 0, "polled").encode_to_vec());
    assert_eq!(polled_once.status, 200);
    let mut staying = OpampWs::connect(server.opamp, &token).expect("connects");
    staying.send(&full_state(quiet, 0, "staying"));
    // Each was answered, so each was known; the two silent ones go within a few seconds.
    staying.recv();

    let deadline = Instant::now() + WAIT;
    while known_uids(&server) != [uid_text(quiet)] {
        assert!(Instant::now() < deadline, "still known: {:?}; logs:\n{}", known_uids(&server), server.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(server.get(&format!("/api/v1/instances/{}", uid_text(gone))).status, 404);
    assert!(server.get("/metrics").body.contains("\ngitfleet_instances_forgotten_total 2\n"));
    assert!(server.logs().contains("forgot instances not heard from"), "{}", server.logs());
    drop(staying);
    assert_eq!(server.stop(), Some(0));

    // The store forgot them too: after a restart only the connected one comes back.
    let server = Server::start(&path, data.path(), &["--poll-interval", "1h", "--forget-after", "never"]);
    assert_eq!(known_uids(&server), [uid_text(quiet)]);
    server.stop();
}

fn loadgen(server: &Server, fleet: &str, args: &[&str]) -> serde_json::Value {
    loadgen_over(server, "ws", fleet, args)
}

fn loadgen_over(server: &Server, scheme: &str, fleet: &str, args: &[&str]) -> serde_json::Value {
    let url = format!("{scheme}://{}/v1/opamp", server.opamp);
    let (code, figures, stderr) = loadgen_run(&url, &server.token(fleet), args);
    assert_eq!(code, Some(0), "loadgen failed: {stderr}");
    figures
}

/// Runs loadgen; returns its exit code, its figures and the last line of its errors.
fn loadgen_run(url: &str, token: &str, args: &[&str]) -> (Option<i32>, serde_json::Value, String) {
    let output = crate::common::gitfleet()
        .args(["loadgen", "--url", url, "--token", token])
        .args(args)
        .output()
        .expect("loadgen runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let figures = serde_json::from_str(stdout.lines().last().unwrap_or("null")).expect("JSON figures");
    (output.status.code(), figures, stderr.lines().last().unwrap_or_default().to_owned())
}

#[test]
fn loadgen_takes_host_names_and_fails_a_run_that_could_not_get_in() {
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    let server = Server::start(&repo.url(), data.path(), &[]);
    let token = server.token("nodes");
    let by_name = format!("ws://localhost:{}/v1/opamp", server.opamp.port());
    let args = ["--agents", "3", "--heartbeat", "1s", "--duration", "2s"];
    let (code, figures, stderr) = loadgen_run(&by_name, &token, &args);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!((figures["connects"].as_u64(), figures["applied"].as_u64()), (Some(3), Some(3)), "{figures}");

    let (code, figures, stderr) = loadgen_run(&by_name, "tk_00000000.wrong", &args);
    assert_eq!(code, Some(2), "{figures}");
    assert_eq!(figures["unauthorized"], 3, "the figures are printed too: {figures}");
    assert_eq!(
        stderr,
        "gitfleet: 3 of 3 agents were refused (401): the token is not valid for this server, or it was revoked or expired"
    );

    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let nobody = format!("http://{}/v1/opamp", closed.local_addr().expect("address"));
    drop(closed);
    let (code, figures, stderr) = loadgen_run(&nobody, &token, &["--agents", "2", "--duration", "1s"]);
    assert_eq!(code, Some(2), "{figures}");
    assert!(
        stderr.starts_with("gitfleet: 2 of 2 agents never connected: cannot connect to 127.0.0.1:")
            && stderr.ends_with("Connection refused (os error 111)"),
        "{stderr}"
    );
}

#[test]
fn loadgen_agents_converge_with_failures_counted() {
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    let server = Server::start(&repo.url(), data.path(), &[]);
    let figures = loadgen(
        &server,
        "nodes",
        &[
            "--agents",
            "30",
            "--fail-ratio",
            "0.3",
            "--heartbeat",
            "1s",
            "--duration",
            "3s",
            "--source-ips",
            "127.0.0.2-127.0.0.4",
        ],
    );
    assert_eq!(figures["connects"], 30, "{figures}");
    assert_eq!(figures["errors"], 0, "{figures}");
    let (applied, failed) =
        (figures["applied"].as_u64().expect("applied"), figures["failed"].as_u64().expect("failed"));
    assert_eq!(applied + failed, 30, "every agent applied or failed its config: {figures}");
    assert!(failed > 0 && applied > 0, "a 30% failure ratio over 30 agents: {figures}");
    let fleet = server.json("/api/v1/fleets/nodes");
    assert_eq!(fleet["instances"], 30);
    assert_eq!(fleet["counts"]["failed"].as_u64(), Some(failed), "{fleet}");
    // The loadgen agents said goodbye; they are in sync or failed until they go stale.
    assert_eq!(fleet["counts"]["in_sync"].as_u64(), Some(applied), "{fleet}");

    // Filtering and paging.
    let failed_list = server.json("/api/v1/instances?status=failed");
    let statuses: Vec<&str> = failed_list["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .map(|i| i["status"].as_str().expect("status"))
        .collect();
    assert_eq!(statuses.len() as u64, failed, "{failed_list}");
    assert!(statuses.iter().all(|s| *s == "failed"));
    assert_eq!(failed_list["next_cursor"], serde_json::Value::Null);
    let mut seen = Vec::new();
    let mut path = "/api/v1/instances?fleet=nodes&limit=7".to_owned();
    loop {
        let page = server.json(&path);
        let uids = page["instances"]
            .as_array()
            .expect("instances")
            .iter()
            .map(|i| i["instance_uid"].as_str().expect("uid").to_owned());
        seen.extend(uids);
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/api/v1/instances?fleet=nodes&limit=7&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(seen.len(), 30, "every instance once, over 5 pages");
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "in instance_uid order, no repeats");
    let in_fleet = server.json("/api/v1/fleets/nodes/instances?status=in_sync&limit=1000");
    assert_eq!(in_fleet["instances"].as_array().map(Vec::len) as Option<usize>, Some(applied as usize));
    for (path, status) in [
        ("/api/v1/instances?status=broken", 400),
        ("/api/v1/instances?limit=0", 400),
        ("/api/v1/instances?cursor=zzz", 400),
        ("/api/v1/instances?fleet=nope", 404),
        ("/api/v1/fleets/nodes/instances?status=bogus", 400),
    ] {
        let response = server.get(path);
        assert_eq!(response.status, status, "{path}: {}", response.body);
    }
    assert!(
        server
            .get("/api/v1/instances?status=broken")
            .body
            .contains("in_sync, pending, applying, failed, stale, observed")
    );
}

#[test]
fn agents_that_come_back_without_their_config_get_it_again() {
    // loadgen agents keep nothing between runs: a second run is the same collectors
    // restarted without their state. They report UNSET, and must be sent the config again.
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    let server = Server::start(&repo.url(), data.path(), &[]);
    for (scheme, fleet) in [("ws", "nodes"), ("http", "staging-gateway")] {
        let args = ["--agents", "4", "--heartbeat", "1s", "--duration", "3s"];
        for run in ["first", "second"] {
            let figures = loadgen_over(&server, scheme, fleet, &args);
            assert_eq!(figures["configs_received"], 4, "{scheme}, {run} run: {figures}");
            assert_eq!(figures["applied"], 4, "{scheme}, {run} run: {figures}");
            let fleet = server.json(&format!("/api/v1/fleets/{fleet}"));
            assert_eq!(
                (fleet["instances"].as_u64(), fleet["counts"]["in_sync"].as_u64()),
                (Some(4), Some(4)),
                "{fleet}"
            );
        }
    }
}

#[test]
fn a_flood_over_the_connection_limit_gets_503_while_admitted_agents_work() {
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    let server = Server::start(&repo.url(), data.path(), &["--max-connections", "5"]);
    let url = format!("ws://{}/v1/opamp", server.opamp);
    let args = ["--agents", "12", "--heartbeat", "1s", "--duration", "2s"];
    let (code, figures, stderr) = loadgen_run(&url, &server.token("prod-gateway"), &args);
    assert_eq!(code, Some(2), "agents that never got in fail the run: {figures}");
    assert_eq!(stderr, "gitfleet: 7 of 12 agents never connected: the server answered 503 (busy)");
    assert_eq!(figures["connects"], 5, "only five admitted: {figures}");
    assert!(figures["refused"].as_u64().is_some_and(|n| n >= 7), "the rest were turned away: {figures}");
    let fleet = server.json("/api/v1/fleets/prod-gateway");
    assert_eq!(fleet["counts"]["in_sync"], 5, "{fleet}");
    let blocked = http(
        server.opamp,
        "GET",
        "/v1/opamp",
        &[("Authorization", &format!("Bearer {}", server.token("prod-gateway")))],
        b"",
    );
    assert_ne!(blocked.status, 503, "slots are free again after the flood");
}

#[test]
fn a_reconnect_takes_over_its_id_and_the_old_connection_is_closed() {
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    let server = Server::start(&repo.url(), data.path(), &[]);
    let token = server.token("prod-gateway");
    let uid = [0x46; 16];
    let mut old = OpampWs::connect(server.opamp, &token).expect("connects");
    old.send(&full_state(uid, 0, "gw-3"));
    old.recv();
    // The agent reconnects before the server noticed its old connection is gone.
    let mut new = OpampWs::connect(server.opamp, &token).expect("reconnects");
    new.send(&full_state(uid, 1, "gw-3"));
    let reply = new.recv();
    assert!(reply.agent_identification.is_none(), "a reconnect keeps its identity");
    old.send(&full_state(uid, 1, "gw-3"));
    assert_eq!(old.next().err().as_deref(), Some("close 1008"), "the replaced connection is told to go");
    let instances = server.json("/api/v1/fleets/prod-gateway/instances");
    assert_eq!(instances["instances"].as_array().map(Vec::len), Some(1), "still one instance");
}
