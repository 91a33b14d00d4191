//! Real OpAMP clients written by others (shared/reference/peers.md), installed at pinned
//! versions by `tests/peers/install.sh`: the Python `opentelemetry-opamp-client` and the
//! Node `@elastic/opamp-client-node`. Both speak plain HTTP; the Node one over TLS here.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{GitRepo, SelfSigned, Server, example};

const WAIT: Duration = Duration::from_secs(20);

fn peers() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers")
}

/// A peer agent process whose JSON lines arrive on a channel; killed on drop.
struct Peer {
    child: Child,
    lines: Receiver<Value>,
    seen: Vec<Value>,
}

impl Peer {
    fn start(mut command: Command) -> Self {
        let mut child = command.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("the peer starts");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(value) = serde_json::from_str::<Value>(&line) {
                    let _ = tx.send(value);
                }
            }
        });
        Self { child, lines, seen: Vec::new() }
    }

    /// Waits for an event that `accept` takes; panics with everything seen otherwise.
    fn wait_for(&mut self, what: &str, accept: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(value) => {
                    self.seen.push(value.clone());
                    if accept(&value) {
                        return value;
                    }
                }
                Err(_) => break,
            }
        }
        panic!("the peer did not report {what}; it said: {:#?}", self.seen);
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn python_agent(endpoint: &str, token: &str, host: &str) -> Command {
    let python = peers().join(".venv/bin/python");
    assert!(python.exists(), "the Python OpAMP client is not installed: run tests/peers/install.sh");
    let mut command = Command::new(python);
    command.arg(peers().join("python/agent.py")).args([endpoint, token, host, "60"]);
    command
}

fn node_agent(endpoint: &str, token: &str, host: &str) -> Command {
    let node = peers().join("node");
    assert!(
        node.join("node_modules/@elastic/opamp-client-node").exists(),
        "the Node OpAMP client is not installed: run tests/peers/install.sh"
    );
    let mut command = Command::new("node");
    command.current_dir(&node).arg("agent.mjs").args([endpoint, token, host, "60"]);
    command
}

/// Publishes a new version of `config` (changing `from` to `to` in its file) and points
/// `fleet` at it.
fn roll_out(repo: &GitRepo, config_file: &str, from: &str, to: &str, tag: &str, fleet: &str) {
    let path = repo.path().join(config_file);
    let text = std::fs::read_to_string(&path).expect("read config");
    assert!(text.contains(from), "{config_file} contains {from}");
    repo.write(config_file, text.replace(from, to));
    repo.commit(&format!("publish {tag}"));
    repo.annotated_tag(tag, "new version");
    let fleet_file = format!("fleets/{fleet}.toml");
    let version = tag.split_once('/').expect("tag").1;
    let text = std::fs::read_to_string(repo.path().join(&fleet_file)).expect("read fleet");
    repo.write(&fleet_file, text.replace("version = \"v1\"", &format!("version = \"{version}\"")));
    repo.commit(&format!("roll out {tag}"));
}

/// Whether a peer reaches the server over TLS.
#[derive(Clone, Copy, PartialEq)]
enum Transport {
    Plain,
    Tls,
}

/// A peer receives the fleet's config, the API shows it in sync, a rollout reaches it on its
/// next poll, and it is in sync again.
fn follows_a_rollout(
    start: impl Fn(&str, &str, &str) -> Command,
    transport: Transport,
    fleet: &str,
    config_file: &str,
    from: &str,
    to: &str,
    tag: &str,
) {
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    let repo_path = repo.path().display().to_string();
    let certificates = tempfile::tempdir().expect("temp dir");
    let certificate = SelfSigned::new(certificates.path(), "gitfleet");
    let server = match transport {
        Transport::Plain => Server::start(&repo_path, data.path(), &["--poll-interval", "1h"]),
        Transport::Tls => {
            Server::start_tls(&repo_path, data.path(), &certificate.cert, &certificate.key, &["--poll-interval", "1h"])
        }
    };
    let scheme = if transport == Transport::Tls { "https" } else { "http" };
    let endpoint = format!("{scheme}://{}/v1/opamp", server.opamp);
    let token = server.token(fleet);
    let assigned = server.json(&format!("/api/v1/fleets/{fleet}"))["config_hash"].as_str().expect("hash").to_owned();

    let mut command = start(&endpoint, &token, "peer-host-1");
    // Each client's own way to trust a private CA: Node's TLS stack and Python's requests.
    command.env("NODE_EXTRA_CA_CERTS", &certificate.cert).env("REQUESTS_CA_BUNDLE", &certificate.cert);
    let mut peer = Peer::start(command);
    let uid =
        peer.wait_for("its instance id", |v| v["event"] == "started")["instance_uid"].as_str().expect("uid").to_owned();
    peer.wait_for("the assigned config", |v| v["event"] == "config" && v["config_hash"] == assigned.as_str());
    let instance =
        server.wait_for(&format!("/api/v1/instances/{uid}"), WAIT, "the peer in sync", |i| i["status"] == "in_sync");
    assert_eq!(instance["host"], "peer-host-1");
    assert_eq!(instance["transport"], "http");
    assert_eq!(server.json(&format!("/api/v1/fleets/{fleet}"))["counts"]["in_sync"], 1);

    roll_out(&repo, config_file, from, to, tag, fleet);
    let fleet_now = server.wait_for(&format!("/api/v1/fleets/{fleet}"), WAIT, "the rollout", |f| f["tag"] == tag);
    let next = fleet_now["config_hash"].as_str().expect("hash").to_owned();
    assert_ne!(next, assigned);
    peer.wait_for("the new version", |v| v["event"] == "config" && v["config_hash"] == next.as_str());
    server.wait_for(&format!("/api/v1/instances/{uid}"), WAIT, "in sync at the new version", |i| {
        i["status"] == "in_sync" && i["assigned_hash"] == next.as_str()
    });
}

#[test]
fn the_python_client_follows_a_json_fleet() {
    follows_a_rollout(
        python_agent,
        Transport::Plain,
        "sdk-agents",
        "configs/sdk-agent.json",
        "\"ratio\": 0.25",
        "\"ratio\": 0.5",
        "sdk-agent/v2",
    );
}

#[test]
fn the_node_client_follows_a_collector_fleet_over_tls() {
    follows_a_rollout(
        node_agent,
        Transport::Tls,
        "nodes",
        "configs/node-agent.yaml",
        "limit_mib: 256",
        "limit_mib: 384",
        "node-agent/v2",
    );
}

#[test]
fn real_clients_with_a_bad_token_get_401() {
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    let server = Server::start(&repo.url(), data.path(), &[]);
    server.token("sdk-agents");
    let endpoint = format!("http://{}/v1/opamp", server.opamp);
    let mut python = Peer::start(python_agent(&endpoint, "tk_00000000.0000", "intruder"));
    let failure = python.wait_for("the refusal", |v| v["event"] == "connect_failed");
    assert!(failure["error"].as_str().is_some_and(|e| e.contains("401")), "{failure}");
    let mut node = Peer::start(node_agent(&endpoint, "tk_00000000.0000", "intruder"));
    let failure = node
        .wait_for("the refusal", |v| v["event"] == "log" && v["message"].as_str().is_some_and(|m| m.contains("401")));
    assert_eq!(failure["level"], "error");
    assert_eq!(server.json("/api/v1/instances")["instances"], serde_json::json!([]), "nobody got in");
}
