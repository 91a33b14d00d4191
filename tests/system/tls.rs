//! TLS on both ports (`--tls-cert`, `--tls-key`): OpAMP over `wss://` and `https://`, the
//! API over `https://`, a renewed certificate served without a restart, and certificate
//! files that cannot be used refused before anything is bound.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gitfleet::opamp::proto::ServerToAgent;
use gitfleet::repo::yaml;
use prost::Message;
use serde_json::Value;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::pki_types::pem::PemObject;

use crate::common::{
    OpampWs, SelfSigned, Server, example, gitfleet, https, tls_client, tls_client_at, tls_connect, tls_handshake,
};
use crate::opamp::{full_state, uid_text};

const WAIT: Duration = Duration::from_secs(20);

/// The certificate the server presents on `address`.
fn presented(address: SocketAddr, tls: &Arc<ClientConfig>) -> CertificateDer<'static> {
    let stream = tls_connect(address, tls);
    stream.conn.peer_certificates().expect("the server's certificates")[0].clone().into_owned()
}

fn certificate_in(path: &Path) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(path).expect("a PEM certificate")
}

fn tls_problems(repo: &Value) -> Vec<Value> {
    let problems = repo["problems"].as_array().expect("problems");
    problems.iter().filter(|p| p["message"].as_str().is_some_and(|m| m.starts_with("TLS:"))).cloned().collect()
}

#[test]
fn both_ports_speak_tls_and_collectors_connect_over_wss_and_https() {
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    let certificates = tempfile::tempdir().expect("temp dir");
    let certificate = SelfSigned::new(certificates.path(), "gitfleet");
    let repo_path = repo.path().display().to_string();
    let server =
        Server::start_tls(&repo_path, data.path(), &certificate.cert, &certificate.key, &["--poll-interval", "1h"]);
    let tls = server.tls.clone().expect("a TLS client");

    // The people port answers over TLS only: plain HTTP gets no HTTP answer.
    assert_eq!(server.get("/healthz").status, 200);
    let token = server.token("prod-gateway");
    let mut plain = TcpStream::connect(server.web).expect("connect");
    plain.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    plain.write_all(b"GET /healthz HTTP/1.1\r\nHost: gitfleet\r\nConnection: close\r\n\r\n").expect("send");
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(!answer.starts_with(b"HTTP/"), "plain HTTP was answered: {}", String::from_utf8_lossy(&answer));
    // That was a failed handshake, counted; and the certificate's end is a metric.
    let deadline = Instant::now() + WAIT;
    let metrics = loop {
        let metrics = server.get("/metrics").body;
        if metrics.contains("\ngitfleet_tls_handshake_failures_total 1\n") {
            break metrics;
        }
        assert!(Instant::now() < deadline, "no failed handshake counted:\n{metrics}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let not_after = metrics
        .lines()
        .find_map(|line| line.strip_prefix("gitfleet_tls_certificate_expiry_timestamp_seconds "))
        .and_then(|value| value.parse::<u64>().ok())
        .expect("the certificate's end");
    let in_two_days =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").as_secs() + 2 * 86_400;
    assert!(not_after.abs_diff(in_two_days) < 3600, "{not_after} is not two days ahead");

    // OpAMP over wss://: the fleet's config arrives and the instance is a WebSocket one.
    let uid = [0x81; 16];
    let mut agent = OpampWs::connect_over(server.opamp, Some(&tls), &token).expect("a wss:// connection");
    agent.send(&full_state(uid, 0, "tls-websocket"));
    let reply = agent.recv();
    assert_eq!(reply.instance_uid, uid.to_vec());
    assert!(reply.remote_config.is_some(), "the fleet's config over wss://");
    let instance = server.json(&format!("/api/v1/instances/{}", uid_text(uid)));
    assert_eq!(instance["transport"], "websocket");
    assert_eq!(instance["host"], "tls-websocket");

    // OpAMP over https://, and a wrong token is still refused.
    let bearer = format!("Bearer {token}");
    let protobuf = ("Content-Type", "application/x-protobuf");
    let body = full_state([0x82; 16], 0, "tls-http").encode_to_vec();
    let response = https(server.opamp, &tls, "POST", "/v1/opamp", &[protobuf, ("Authorization", &bearer)], &body);
    assert_eq!(response.status, 200, "{}", response.body);
    let reply = ServerToAgent::decode(response.bytes.as_slice()).expect("a ServerToAgent");
    assert_eq!(reply.instance_uid, vec![0x82; 16]);
    assert!(reply.remote_config.is_some(), "the fleet's config over https://");
    let wrong = [protobuf, ("Authorization", "Bearer tk_00000000.0000")];
    assert_eq!(https(server.opamp, &tls, "POST", "/v1/opamp", &wrong, &body).status, 401);

    // Simulated collectors over wss://, trusting the certificate given with --ca-file.
    let output = gitfleet()
        .args(["loadgen", "--url", &format!("wss://{}/v1/opamp", server.opamp), "--token", &token])
        .arg("--ca-file")
        .arg(&certificate.cert)
        .args(["--agents", "10", "--heartbeat", "1s", "--duration", "4s"])
        .output()
        .expect("loadgen runs");
    assert!(output.status.success(), "loadgen: {}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let figures: Value = serde_json::from_str(stdout.lines().last().expect("figures")).expect("JSON figures");
    assert_eq!((figures["connects"].as_u64(), figures["errors"].as_u64()), (Some(10), Some(0)), "{figures}");
    assert_eq!(figures["applied"], 10, "{figures}");
    // Without the certificate to trust, loadgen refuses to start.
    let output = gitfleet()
        .args(["loadgen", "--url", &format!("wss://{}/v1/opamp", server.opamp), "--token", &token])
        .output()
        .expect("loadgen runs");
    assert_eq!(output.status.code(), Some(2), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stderr).contains("needs --ca-file"));

    // A fleet without an endpoint or --public-url is told to dial this server over wss://.
    let nodes = format!("Bearer {}", server.token("nodes"));
    let file = https(server.opamp, &tls, "GET", "/v1/install/supervisor.yaml", &[("Authorization", &nodes)], b"");
    assert_eq!(file.status, 200, "{}", file.body);
    let supervisor = yaml::parse(&file.body).expect("YAML").expect("a document");
    let endpoint = supervisor.get("server").and_then(|s| s.get("endpoint")).and_then(yaml::Node::as_str);
    let endpoint = endpoint.expect("server.endpoint");
    assert!(
        endpoint.starts_with("wss://") && endpoint.ends_with(&format!(":{}/v1/opamp", server.opamp.port())),
        "{endpoint}"
    );
    server.stop();
}

#[test]
fn a_renewed_certificate_is_served_without_a_restart_and_a_broken_one_is_a_problem() {
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    let (live, renewal) = (tempfile::tempdir().expect("temp dir"), tempfile::tempdir().expect("temp dir"));
    let first = SelfSigned::new(live.path(), "gitfleet");
    let next = SelfSigned::new(renewal.path(), "gitfleet");
    let repo_path = repo.path().display().to_string();
    let server = Server::start_tls(&repo_path, data.path(), &first.cert, &first.key, &["--poll-interval", "1h"]);
    let trusting_both = tls_client(&[&first.cert, &next.cert]);
    assert_eq!(presented(server.opamp, &trusting_both), certificate_in(&first.cert));
    let token = server.token("prod-gateway");
    let mut agent = OpampWs::connect_over(server.opamp, server.tls.as_ref(), &token).expect("connects");
    agent.send(&full_state([0x91; 16], 0, "before-renewal"));
    agent.recv();

    // The renewal lands in place, key first, as a certificate manager would write it.
    std::fs::copy(&next.key, &first.key).expect("copy the key");
    std::fs::copy(&next.cert, &first.cert).expect("copy the certificate");
    let renewed = certificate_in(&next.cert);
    let deadline = Instant::now() + WAIT;
    while presented(server.web, &trusting_both) != renewed {
        assert!(Instant::now() < deadline, "the renewed certificate was not picked up; logs:\n{}", server.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(presented(server.opamp, &trusting_both), renewed, "both ports");
    // The session opened before the renewal carries on.
    agent.send(&full_state([0x91; 16], 1, "before-renewal"));
    assert_eq!(agent.recv().instance_uid, vec![0x91; 16]);
    server.wait_for("/api/v1/repo", WAIT, "no TLS problem after a clean renewal", |r| tls_problems(r).is_empty());

    // A key that cannot be used is a warning; the renewed certificate stays in use.
    std::fs::write(&first.key, "-----BEGIN PRIVATE KEY-----\ncut short\n").expect("write");
    let repo_state = server.wait_for("/api/v1/repo", WAIT, "the TLS problem", |r| !tls_problems(r).is_empty());
    let problem = &tls_problems(&repo_state)[0];
    assert_eq!(problem["severity"], "warning");
    let message = problem["message"].as_str().expect("a message");
    assert!(message.contains(&first.key.display().to_string()), "{message}");
    assert!(message.ends_with("the previous certificate stays in use"), "{message}");
    assert_eq!(presented(server.opamp, &trusting_both), renewed);

    // Put right, the problem clears.
    std::fs::copy(&next.key, &first.key).expect("copy the key");
    server.wait_for("/api/v1/repo", WAIT, "the TLS problem cleared", |r| tls_problems(r).is_empty());
    assert!(server.logs().contains("TLS certificate loaded again"));
    server.stop();
}

/// A certificate for 127.0.0.1 valid only in January 2025, signed by its own key with
/// `openssl ca` (`openssl req` cannot date a certificate in the past).
fn expired_certificate(dir: &Path) -> SelfSigned {
    std::fs::write(dir.join("index.txt"), "").expect("write");
    std::fs::write(dir.join("serial"), "01\n").expect("write");
    let config = "[ca]\ndefault_ca = this\n[this]\ndatabase = index.txt\nnew_certs_dir = .\nserial = serial\n\
                  default_md = sha256\npolicy = any\nx509_extensions = leaf\n[any]\ncommonName = supplied\n\
                  [leaf]\nbasicConstraints = critical,CA:FALSE\nsubjectAltName = IP:127.0.0.1\n";
    std::fs::write(dir.join("ca.cnf"), config).expect("write");
    let openssl = |args: &[&str]| {
        let output = Command::new("openssl").current_dir(dir).args(args).output().expect("openssl runs");
        assert!(output.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    };
    openssl(
        &["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=old"]
            .into_iter()
            .chain(["-keyout", "old.key", "-out", "old.csr"])
            .collect::<Vec<_>>(),
    );
    openssl(
        &["ca", "-batch", "-selfsign", "-config", "ca.cnf", "-keyfile", "old.key", "-in", "old.csr"]
            .into_iter()
            .chain(["-startdate", "20250101000000Z", "-enddate", "20250201000000Z", "-out", "old.crt"])
            .collect::<Vec<_>>(),
    );
    SelfSigned { cert: dir.join("old.crt"), key: dir.join("old.key") }
}

#[test]
fn an_expired_certificate_is_an_error_problem_and_its_end_a_metric() {
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    let dir = tempfile::tempdir().expect("temp dir");
    let old = expired_certificate(dir.path());
    let repo_path = repo.path().display().to_string();
    // The server starts (a renewal may be on its way) and says what is wrong.
    let mut server = Server::start_tls(&repo_path, data.path(), &old.cert, &old.key, &["--poll-interval", "1h"]);
    let refused = tls_handshake(server.web, server.tls.as_ref().expect("a TLS client")).expect_err("refused");
    assert!(refused.to_string().contains("certificate expired"), "{refused}");
    // A client that lives in January 2025 can still read what the server says.
    server.tls = Some(tls_client_at(&[&old.cert], Some(1_736_899_200)));
    let repo_state = server.wait_for("/api/v1/repo", WAIT, "the expiry error", |r| !tls_problems(r).is_empty());
    let problem = &tls_problems(&repo_state)[0];
    assert_eq!(problem["severity"], "error");
    let expected =
        format!("TLS: the certificate in {} expired at 2025-02-01T00:00:00Z; collectors refuse it", old.cert.display());
    assert_eq!(problem["message"], expected.as_str());
    let metrics = server.get("/metrics").body;
    assert!(metrics.contains("\ngitfleet_tls_certificate_expiry_timestamp_seconds 1738368000\n"), "{metrics}");
    assert!(server.logs().contains("the TLS certificate needs renewing"), "{}", server.logs());
    server.stop();
}

#[test]
fn certificate_files_that_cannot_be_used_stop_the_server_with_one_clear_line() {
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    let dir = tempfile::tempdir().expect("temp dir");
    let (one, other) = (SelfSigned::new(dir.path(), "one"), SelfSigned::new(dir.path(), "other"));
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not PEM at all\n").expect("write");
    let missing = dir.path().join("missing.pem");
    let text = |path: &Path| path.display().to_string();
    let cases: [(&Path, &Path, String); 5] = [
        (&missing, &one.key, format!("gitfleet: --tls-cert/--tls-key: {}: No such file", text(&missing))),
        (&junk, &one.key, format!("gitfleet: --tls-cert/--tls-key: {}: no PEM certificate in it", text(&junk))),
        (
            &one.cert,
            &one.cert,
            format!("gitfleet: --tls-cert/--tls-key: {}: no unencrypted PEM private key", text(&one.cert)),
        ),
        (
            &one.cert,
            &other.key,
            format!(
                "gitfleet: --tls-cert/--tls-key: {} is not the private key of the certificate in {}",
                text(&other.key),
                text(&one.cert)
            ),
        ),
        (&one.key, &one.key, format!("gitfleet: --tls-cert/--tls-key: {}: no PEM certificate in it", text(&one.key))),
    ];
    let repo_path = repo.path().display().to_string();
    let serve = |cert: &Path, key: Option<&Path>| {
        let mut command = gitfleet();
        command.args(["serve", "--repo", &repo_path, "--tls-cert"]).arg(cert).arg("--data-dir").arg(data.path());
        if let Some(key) = key {
            command.arg("--tls-key").arg(key);
        }
        let output = command.output().expect("gitfleet runs");
        (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
    };
    for (cert, key, expected) in cases {
        let (code, stderr) = serve(cert, Some(key));
        assert_eq!(code, Some(2), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with(&expected), "expected {expected:?}, got {stderr}");
    }
    // One without the other is a usage error naming the missing flag.
    let (code, stderr) = serve(&one.cert, None);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--tls-key"), "{stderr}");
}
