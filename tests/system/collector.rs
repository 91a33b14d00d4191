//! The real thing: the upstream OpAMP Supervisor running a collector built from upstream
//! modules (`tests/peers/install.sh` builds both into `tests/peers/releases`), installed from
//! gitfleet's own install files as a user's host would be, driven through Git, and checked
//! on the API, the status page and the status branch. The collectors export to a backend
//! stand-in, so each test also sees the data path follow the configuration in Git.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{GitRepo, SelfSigned, Server, free_port, gitfleet, http, tls_client};

/// The Supervisor release the install files pin by default, and the oldest one supported.
const SUPERVISOR: &str = "0.158.0";
const OLDEST_SUPERVISOR: &str = "0.149.0";
const COLLECTOR: &str = "0.158.0";
const FLEET: &str = "prod-gateway";
/// The Supervisor bootstraps the collector, then waits `config_apply_timeout` (15 s in the
/// install files) of health before it calls a configuration applied.
const CONVERGE: Duration = Duration::from_secs(90);

/// One host at a time: a Supervisor and its collector take much of this machine for a few
/// seconds while they start, and these tests are about behaviour, not load.
static ONE_HOST_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_host_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_HOST_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn releases() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/releases");
    assert!(
        dir.join(format!("opampsupervisor_{SUPERVISOR}_linux_{}", arch())).is_file(),
        "the real Supervisor and collector are not built: run tests/setup.sh"
    );
    dir
}

fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "arm64",
        _ => "amd64",
    }
}

/// Requests a backend got: path and (gunzipped) body.
type Exports = Mutex<Vec<(String, Vec<u8>)>>;

/// The backend the collectors export to: an OTLP/HTTP endpoint that keeps every request
/// it gets.
struct Backend {
    address: SocketAddr,
    received: Arc<Exports>,
}

impl Backend {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the backend");
        let address = listener.local_addr().expect("address");
        let received: Arc<Exports> = Arc::default();
        let sink = Arc::clone(&received);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let sink = Arc::clone(&sink);
                std::thread::spawn(move || {
                    let _ = Self::serve(stream, &sink);
                });
            }
        });
        Self { address, received }
    }

    /// Answers OTLP/HTTP exports on one connection until it closes.
    fn serve(stream: TcpStream, sink: &Exports) -> std::io::Result<()> {
        let mut writer = stream.try_clone()?;
        let mut reader = BufReader::new(crate::common::Restarting(stream));
        loop {
            let mut request = String::new();
            if reader.read_line(&mut request)? == 0 {
                return Ok(());
            }
            let path = request.split_whitespace().nth(1).unwrap_or_default().to_owned();
            let (mut length, mut gzip) = (0, false);
            loop {
                let mut line = String::new();
                reader.read_line(&mut line)?;
                let line = line.trim_end();
                if line.is_empty() {
                    break;
                }
                if let Some((name, value)) = line.split_once(':') {
                    match name.trim().to_ascii_lowercase().as_str() {
                        "content-length" => length = value.trim().parse().unwrap_or(0),
                        "content-encoding" => gzip = value.trim() == "gzip",
                        _ => {}
                    }
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body)?;
            if gzip {
                let mut plain = Vec::new();
                flate2::read::GzDecoder::new(body.as_slice()).read_to_end(&mut plain)?;
                body = plain;
            }
            sink.lock().expect("backend lock").push((path, body));
            writer
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n")?;
        }
    }

    /// Waits for a trace export whose body holds `text` (a resource attribute value).
    fn wait_for_traces_with(&self, text: &str, host: &Host) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let found = self.received.lock().expect("backend lock").iter().any(|(path, body)| {
                path == "/v1/traces" && body.windows(text.len()).any(|window| window == text.as_bytes())
            });
            if found {
                return;
            }
            assert!(Instant::now() < deadline, "no trace export holding {text:?}; supervisor:\n{}", host.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The ports one test's collector listens on.
struct Ports {
    grpc: u16,
    http: u16,
    health: u16,
}

/// The example repository's gateway configuration with this test's ports, exporting to
/// `backend`, and `environment` as the value of the resource attribute it sets.
fn gateway(ports: &Ports, backend: SocketAddr, environment: &str) -> String {
    let example =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("example-repo/configs/gateway.yaml"))
            .expect("the example gateway configuration");
    let replacements = [
        ("0.0.0.0:4317", format!("127.0.0.1:{}", ports.grpc)),
        ("0.0.0.0:4318", format!("127.0.0.1:{}", ports.http)),
        ("0.0.0.0:13133", format!("127.0.0.1:{}", ports.health)),
        ("https://otlp.backend.example.com", format!("http://{backend}")),
        ("value: production", format!("value: {environment}")),
    ];
    replacements.iter().fold(example, |config, (from, to)| {
        assert!(config.contains(from), "the example gateway configuration has `{from}`");
        config.replace(from, to)
    })
}

fn fleet_file(version: &str, endpoint: Option<&str>, supervisor: &str, rotate: u32) -> String {
    let endpoint = endpoint.map(|e| format!("endpoint = \"{e}\"\n")).unwrap_or_default();
    format!(
        "description = \"Gateways of the end-to-end test\"\nconfig = \"gateway\"\nversion = \"{version}\"\n\
         [token]\nrotate = {rotate}\ngrace = \"6s\"\n\
         [install]\n{endpoint}collector_version = \"{COLLECTOR}\"\nsupervisor_version = \"{supervisor}\"\n"
    )
}

/// A config repository with `gateway/v1` published and the fleet on it.
struct Fixture {
    repo: GitRepo,
    ports: Ports,
    backend: Backend,
    endpoint: Option<String>,
    supervisor: &'static str,
}

impl Fixture {
    fn new(endpoint: Option<String>, supervisor: &'static str) -> Self {
        let fixture = Self {
            repo: GitRepo::new(),
            ports: Ports { grpc: free_port(), http: free_port(), health: free_port() },
            backend: Backend::start(),
            endpoint,
            supervisor,
        };
        fixture.publish("v1", &fixture.gateway("production-v1"));
        fixture.roll_out("v1", 0);
        fixture
    }

    fn gateway(&self, environment: &str) -> String {
        gateway(&self.ports, self.backend.address, environment)
    }

    /// A gateway configuration that validates but cannot start: its OTLP/gRPC receiver
    /// listens on a port `taken` holds.
    fn crashing(&self, environment: &str, taken: &TcpListener) -> String {
        let port = taken.local_addr().expect("address").to_string();
        self.gateway(environment).replace(&format!("127.0.0.1:{}", self.ports.grpc), &port)
    }

    fn publish(&self, version: &str, config: &str) {
        self.repo.write("configs/gateway.yaml", config);
        self.repo.commit(&format!("gateway {version}"));
        self.repo.annotated_tag(&format!("gateway/{version}"), &format!("gateway {version}"));
    }

    fn roll_out(&self, version: &str, rotate: u32) {
        self.roll_out_in_steps(version, rotate, "");
    }

    /// Rolls out `version` with `rollout` (a `[rollout]` table) in the fleet file.
    fn roll_out_in_steps(&self, version: &str, rotate: u32, rollout: &str) {
        self.repo.write(
            &format!("fleets/{FLEET}.toml"),
            fleet_file(version, self.endpoint.as_deref(), self.supervisor, rotate) + rollout,
        );
        self.repo.commit(&format!("{FLEET}: gateway {version}"));
    }

    fn path(&self) -> String {
        self.repo.path().display().to_string()
    }

    /// Sends one span to the collector's OTLP/HTTP receiver; the receiver's answer. A
    /// receiver that is starting (the collector's health turns OK with its extensions,
    /// before its pipelines) gets a few seconds.
    fn send_span(&self) -> u16 {
        let span = r#"{"resourceSpans":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"e2e"}}]},"scopeSpans":[{"spans":[{"traceId":"5b8efff798038103d269b633813fc60c","spanId":"eee19b7ec3c1b174","name":"checkout","kind":1,"startTimeUnixNano":"1700000000000000000","endTimeUnixNano":"1700000001000000000"}]}]}]}"#;
        let address: SocketAddr = format!("127.0.0.1:{}", self.ports.http).parse().expect("address");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(address).is_err() {
            assert!(Instant::now() < deadline, "the collector's OTLP receiver on {address} does not take connections");
            std::thread::sleep(Duration::from_millis(100));
        }
        http(address, "POST", "/v1/traces", &[("Content-Type", "application/json")], span.as_bytes()).status
    }
}

/// One host: the files `install.sh` put under a prefix, and the Supervisor it runs.
struct Host {
    dir: tempfile::TempDir,
    prefix: PathBuf,
    supervisor: Option<Child>,
}

impl Host {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let prefix = dir.path().join("root");
        Self { dir, prefix, supervisor: None }
    }

    /// Runs `install.sh --prefix … --no-systemd` (always under a prefix: tests may run as
    /// root); what it printed.
    fn install_with(&self, script: &Path, options: &[&str]) -> String {
        let output = Command::new("sh")
            .arg(script)
            .arg("--prefix")
            .arg(&self.prefix)
            .arg("--no-systemd")
            .args(options)
            .output()
            .expect("sh runs install.sh");
        let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert!(output.status.success(), "install.sh failed:\n{text}");
        text
    }

    /// Unpacks an offline bundle and installs from it; what `install.sh` printed.
    fn install_bundle(&self, bundle: &Path) -> String {
        self.install_bundle_with(bundle, &[])
    }

    /// The same, with more options for `install.sh`.
    fn install_bundle_with(&self, bundle: &Path, options: &[&str]) -> String {
        let unpacked = self.dir.path().join("bundle");
        std::fs::create_dir_all(&unpacked).expect("create dir");
        let status = Command::new("tar").arg("-xzf").arg(bundle).arg("-C").arg(&unpacked).status().expect("tar runs");
        assert!(status.success(), "tar -xzf {}", bundle.display());
        self.install_with(&unpacked.join(format!("gitfleet-{FLEET}-linux-{}/install.sh", arch())), options)
    }

    fn config(&self) -> PathBuf {
        self.prefix.join("etc/gitfleet-collector/supervisor.yaml")
    }

    fn state(&self) -> PathBuf {
        self.prefix.join("var/lib/gitfleet-collector")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("supervisor.log")
    }

    /// The ends of the Supervisor's log and of the collector's (`agent.log`), for failures.
    fn log(&self) -> String {
        let tail = |path: PathBuf| {
            let log = std::fs::read(path).unwrap_or_default();
            String::from_utf8_lossy(&log[log.len().saturating_sub(6_000)..]).into_owned()
        };
        format!("{}\ncollector (agent.log):\n{}", tail(self.log_path()), tail(self.state().join("agent.log")))
    }

    /// Starts the installed Supervisor with the installed `supervisor.yaml`.
    fn start(&mut self) {
        // The collector serves its own metrics on localhost:8888 from its very first start;
        // with the port taken it exits, and the Supervisor with it.
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpListener::bind("127.0.0.1:8888").is_err() {
            let holders: Vec<u32> = self.processes();
            assert!(
                Instant::now() < deadline,
                "127.0.0.1:8888 stays taken (by another collector?); this host's processes: {holders:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).expect("log file");
        let child = Command::new(self.prefix.join("opt/gitfleet-collector/bin/opampsupervisor"))
            .arg("--config")
            .arg(self.config())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("the installed Supervisor starts");
        self.supervisor = Some(child);
    }

    /// The instance id the Supervisor keeps in its state directory.
    fn instance_uid(&self) -> String {
        let path = self.state().join("persistent_state.yaml");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if let Some(uid) = text.lines().find_map(|line| line.strip_prefix("instance_id: ")) {
                return uid.trim().to_owned();
            }
            assert!(Instant::now() < deadline, "no instance id in {}; supervisor:\n{}", path.display(), self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The Supervisor's and the collector's process ids (both run from under the prefix).
    fn processes(&self) -> Vec<u32> {
        let prefix = self.prefix.join("opt").display().to_string();
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
            let command_line = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&command_line).starts_with(&prefix) {
                pids.push(pid);
            }
        }
        pids
    }

    /// `kill -9` of the Supervisor and the collector at once, as a host crash would.
    fn kill_all(&mut self) {
        let pids: Vec<String> = self.processes().iter().map(u32::to_string).collect();
        if !pids.is_empty() {
            let _ = Command::new("kill").arg("-KILL").args(&pids).status();
        }
        if let Some(mut child) = self.supervisor.take() {
            let _ = child.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.processes().is_empty() {
            assert!(Instant::now() < deadline, "processes left after kill -9: {:?}", self.processes());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM to the Supervisor, which stops the collector.
    fn stop(&mut self) {
        if let Some(mut child) = self.supervisor.take() {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            let _ = child.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while !self.processes().is_empty() {
            if Instant::now() > deadline {
                self.kill_all();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// `text` with the install directories moved under `prefix`, as `install.sh --prefix` does.
fn relocated(text: &str, prefix: &Path) -> String {
    let prefix = prefix.display().to_string();
    ["/opt/gitfleet-collector", "/etc/gitfleet-collector", "/var/lib/gitfleet-collector"]
        .iter()
        .fold(text.to_owned(), |text, path| text.replace(path, &format!("{prefix}{path}")))
}

/// `gitfleet install-files` for the fleet into a new directory.
fn install_files(data_dir: &Path, extra: &[&str]) -> tempfile::TempDir {
    let out = tempfile::tempdir().expect("temp dir");
    let output = gitfleet()
        .args(["install-files", FLEET, "--out"])
        .arg(out.path())
        .arg("--data-dir")
        .arg(data_dir)
        .args(extra)
        .output()
        .expect("gitfleet install-files runs");
    assert!(output.status.success(), "install-files: {}", String::from_utf8_lossy(&output.stderr));
    out
}

fn instance(server: &Server, uid: &str, host: &Host, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let path = format!("/api/v1/instances/{uid}");
    let deadline = Instant::now() + CONVERGE;
    loop {
        let response = server.get(&path);
        if response.status == 200 {
            let value: Value = serde_json::from_str(&response.body).expect("JSON");
            if check(&value) {
                return value;
            }
            if Instant::now() > deadline {
                panic!("timed out waiting for {what}; instance: {value:#}\nsupervisor:\n{}", host.log());
            }
        } else if Instant::now() > deadline {
            panic!("timed out waiting for {what}: {} {}\nsupervisor:\n{}", response.status, response.body, host.log());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the instance reports healthy pipeline components and an effective config
/// holding `marker` (the resource attribute value of the version it runs).
fn runs(server: &Server, uid: &str, host: &Host, marker: &str) -> Value {
    instance(server, uid, host, &format!("healthy components running {marker}"), |i| {
        i["healthy"] == true
            && i["effective_config"]["body"].as_str().is_some_and(|body| body.contains(marker))
            && i["health"]["components"].as_array().is_some_and(|components| {
                components.iter().any(|c| c["name"] == "pipeline:traces/receiver:otlp" && c["healthy"] == true)
            })
    })
}

fn in_sync_at(server: &Server, uid: &str, host: &Host, tag: &str) -> Value {
    instance(server, uid, host, &format!("in sync at {tag}"), |i| i["status"] == "in_sync" && i["assigned_tag"] == tag)
}

/// `gitfleet_opamp_remote_configs_sent_total` of `server`.
fn configs_sent(server: &Server) -> u64 {
    metric(server, "gitfleet_opamp_remote_configs_sent_total")
}

fn metric(server: &Server, name: &str) -> u64 {
    let metrics = server.get("/metrics").body;
    metrics
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix(name)?;
            // Labels (`{replica="…"}`), if the metric has them.
            rest.strip_prefix(' ').or_else(|| Some(rest.strip_prefix('{')?.split_once("} ")?.1))
        })
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {name}"))
}

/// How often gitfleet sent the instance its config again because its Supervisor called it
/// applied while the collector ran none of it: the Supervisor's start-up race, which a
/// Supervisor that is sent its config in the reply to its first message runs into now and
/// then (README, "Connecting collectors"). Counts of configs sent allow for these.
fn repairs(server: &Server, uid: &str) -> u64 {
    let instance = server.json(&format!("/api/v1/instances/{uid}"));
    let events = instance["events"].as_array().expect("events");
    events.iter().filter(|e| e["kind"] == "not_running" && e["resent"] == true).count() as u64
}

/// The history's entries for `tag`: the assignment and what followed it, oldest first.
fn events_since_assigned(instance: &Value, tag: &str) -> Vec<Value> {
    let events: Vec<Value> = instance["events"].as_array().expect("events").iter().rev().cloned().collect();
    let start = events.iter().rposition(|e| e["kind"] == "assigned" && e["tag"] == tag).expect("assigned");
    events[start..].to_vec()
}

#[test]
fn a_host_installed_from_the_offline_bundle_follows_git_over_websocket() {
    let _turn = one_host_at_a_time();
    let releases = releases();
    let opamp = format!("127.0.0.1:{}", free_port());
    let fixture = Fixture::new(Some(format!("ws://{opamp}/v1/opamp")), SUPERVISOR);
    let data = tempfile::tempdir().expect("temp dir");
    let releases_text = releases.display().to_string();
    let extra = ["--artifacts-dir", &releases_text, "--status-interval", "1s", "--poll-interval", "1h"];
    let server = Server::start_on(&opamp, "127.0.0.1:0", &fixture.path(), data.path(), &extra);
    server.token(FLEET);

    // The offline bundle for this machine from `gitfleet install-files`, installed.
    let set = install_files(data.path(), &["--artifacts-dir", &releases_text]);
    let mut host = Host::new();
    let printed = host.install_bundle(&set.path().join(format!("gitfleet-{FLEET}-linux-{}.tar.gz", arch())));
    assert!(printed.contains("using the release files of the bundle"), "{printed}");
    let written = std::fs::read_to_string(set.path().join("supervisor.yaml")).expect("supervisor.yaml");
    let installed = std::fs::read_to_string(host.config()).expect("installed supervisor.yaml");
    assert_eq!(installed, relocated(&written, &host.prefix), "only the paths move under the prefix");
    assert!(installed.contains("\n  collector_crash_log_snippet_kib: 4\n"), "{installed}");

    host.start();
    let uid = host.instance_uid();
    let v1 = in_sync_at(&server, &uid, &host, "gateway/v1");
    assert_eq!(v1["transport"], "websocket");
    assert_eq!(v1["agent_version"], COLLECTOR);
    let v1 = runs(&server, &uid, &host, "production-v1");
    let effective = v1["effective_config"]["body"].as_str().expect("effective config");
    assert!(effective.contains(&fixture.backend.address.to_string()), "{effective}");
    assert_eq!(
        v1["available_components"]["receivers"]["otlp"],
        format!("go.opentelemetry.io/collector/receiver/otlpreceiver v{COLLECTOR}"),
        "{v1:#}"
    );
    assert_eq!(fixture.send_span(), 200, "the collector's OTLP receiver takes a span");
    fixture.backend.wait_for_traces_with("production-v1", &host);

    // A rollout in Git reaches it.
    fixture.publish("v2", &fixture.gateway("production-v2"));
    fixture.roll_out("v2", 0);
    let v2 = in_sync_at(&server, &uid, &host, "gateway/v2");
    assert!(v2["effective_config"]["body"].as_str().is_some_and(|body| body.contains("production-v2")), "{v2:#}");
    let v2_hash = v2["assigned_hash"].as_str().expect("hash").to_owned();
    assert_eq!(fixture.send_span(), 200);
    fixture.backend.wait_for_traces_with("production-v2", &host);

    // Valid YAML that the collector refuses: failed with its error, sent once, and the
    // collector keeps running v2.
    let refused = fixture
        .gateway("production-v3")
        .replace("    send_batch_size: 8192\n", "    send_batch_size: 8192\n    send_batch_max_size: 100\n");
    fixture.publish("v3", &refused);
    fixture.roll_out("v3", 0);
    let expected_error = "send_batch_max_size must be greater or equal to send_batch_size";
    let v3 =
        instance(&server, &uid, &host, "v3 failed", |i| i["status"] == "failed" && i["assigned_tag"] == "gateway/v3");
    assert!(v3["error"].as_str().is_some_and(|e| e.contains(expected_error)), "{v3:#}");
    let sent = configs_sent(&server);
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(configs_sent(&server), sent, "a failed config is not sent again");
    let v3 = server.json(&format!("/api/v1/instances/{uid}"));
    let statuses: Vec<String> = events_since_assigned(&v3, "gateway/v3")
        .iter()
        .filter(|e| e["kind"] == "status")
        .map(|e| e["to"].as_str().expect("to").to_owned())
        .collect();
    assert_eq!(statuses.last().map(String::as_str), Some("failed"), "{v3:#}");
    assert_eq!(statuses.iter().filter(|s| *s == "applying").count(), 1, "applied once: {statuses:?}");
    assert_eq!(fixture.send_span(), 200, "v2 still runs");
    let page = server.get(&format!("/instances/{uid}"));
    assert!(page.body.contains(expected_error), "the page shows the error");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = fixture.repo.try_git(&["show", &format!("gitfleet/status:fleets/{FLEET}.json")]);
        if String::from_utf8_lossy(&status.stdout).contains(expected_error) {
            break;
        }
        assert!(Instant::now() < deadline, "the status branch never recorded the failure");
        std::thread::sleep(Duration::from_millis(200));
    }

    // A version that validates but cannot start (its port is taken): failed with the
    // collector's log tail, and the Supervisor rolls back to v2.
    let taken = TcpListener::bind("127.0.0.1:0").expect("hold a port");
    fixture.publish("v4", &fixture.crashing("production-v4", &taken));
    fixture.roll_out("v4", 0);
    let v4 = instance(&server, &uid, &host, "a rollback after v4 crashed", |i| {
        i["status"] == "failed"
            && i["assigned_tag"] == "gateway/v4"
            && i["events"].as_array().is_some_and(|events| {
                events.iter().any(|e| e["kind"] == "rolled_back" && e["running_hash"] == v2_hash.as_str())
            })
    });
    let error = v4["error"].as_str().expect("the error");
    assert!(error.contains("Collector log tail") && error.contains("address already in use"), "{error}");
    runs(&server, &uid, &host, "production-v2");
    assert_eq!(fixture.send_span(), 200, "v2 runs again");
    drop(taken);

    // Rolling back in Git to what it runs: in sync, nothing sent.
    let sent = configs_sent(&server);
    fixture.roll_out("v2", 0);
    in_sync_at(&server, &uid, &host, "gateway/v2");
    assert_eq!(configs_sent(&server), sent, "it already runs v2");

    // gitfleet restarts: the Supervisor reconnects and is in sync, with nothing sent.
    assert_eq!(server.stop(), Some(0));
    let server = Server::start_on(&opamp, "127.0.0.1:0", &fixture.path(), data.path(), &extra);
    instance(&server, &uid, &host, "reconnected in sync", |i| i["status"] == "in_sync" && i["connected"] == true);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(configs_sent(&server), 0, "no push after a restart: {}", server.logs());
    server.stop();
}

#[test]
fn a_host_from_the_one_line_install_polls_over_http_and_survives_a_crash_and_lost_state() {
    let _turn = one_host_at_a_time();
    let releases = releases();
    let opamp = format!("127.0.0.1:{}", free_port());
    let fixture = Fixture::new(Some(format!("http://{opamp}/v1/opamp")), SUPERVISOR);
    let data = tempfile::tempdir().expect("temp dir");
    let releases_text = releases.display().to_string();
    let extra = ["--artifacts-dir", &releases_text, "--poll-interval", "1h"];
    let server = Server::start_on(&opamp, "127.0.0.1:0", &fixture.path(), data.path(), &extra);
    let token = server.token(FLEET);

    // The README's one-line install, from an empty directory (under a prefix here).
    let mut host = Host::new();
    let empty = tempfile::tempdir().expect("temp dir");
    let deadline = Instant::now() + Duration::from_secs(20);
    let output = loop {
        let output = Command::new("sh")
            .arg("-c")
            .arg(r#"curl -fsSLO -H "Authorization: Bearer $TOKEN" "$URL" && sh install.sh --prefix "$PREFIX" --no-systemd"#)
            .current_dir(empty.path())
            .env("TOKEN", &token)
            .env("URL", format!("http://{opamp}/v1/install/install.sh"))
            .env("PREFIX", &host.prefix)
            .output()
            .expect("sh runs");
        // The install files are written just after the token is issued.
        if output.status.success() || Instant::now() > deadline {
            break output;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let printed = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "the one-line install failed:\n{printed}");
    assert!(printed.contains("from gitfleet"), "the release files came from gitfleet:\n{printed}");
    let served = std::fs::read_to_string(data.path().join(format!("install/{FLEET}/supervisor.yaml"))).expect("yaml");
    assert_eq!(std::fs::read_to_string(host.config()).expect("installed"), relocated(&served, &host.prefix));

    host.start();
    let uid = host.instance_uid();
    let first = in_sync_at(&server, &uid, &host, "gateway/v1");
    assert_eq!(first["transport"], "http");
    runs(&server, &uid, &host, "production-v1");
    assert_eq!(fixture.send_span(), 200);
    fixture.backend.wait_for_traces_with("production-v1", &host);
    let sent = configs_sent(&server);
    let repaired = repairs(&server, &uid);
    assert_eq!(sent, 1 + repaired, "one config for one host, plus repairs");

    // kill -9 of the Supervisor and the collector: it comes back with its state, reports
    // what it runs, and is not sent the config again.
    host.kill_all();
    let before = metric(&server, "gitfleet_opamp_messages_received_total");
    host.start();
    instance(&server, &uid, &host, "back after kill -9", |i| {
        i["status"] == "in_sync" && metric(&server, "gitfleet_opamp_messages_received_total") > before
    });
    runs(&server, &uid, &host, "production-v1");
    assert_eq!(fixture.send_span(), 200);
    assert_eq!(configs_sent(&server), sent, "no push after a crash");

    // Its state directory lost, its identity kept: it reports no status, so it is sent
    // the config again, once, and converges.
    host.stop();
    std::fs::remove_dir_all(host.state()).expect("wipe the state");
    std::fs::create_dir_all(host.state()).expect("state dir");
    std::fs::write(host.state().join("persistent_state.yaml"), format!("instance_id: {uid}\n")).expect("write");
    host.start();
    in_sync_at(&server, &uid, &host, "gateway/v1");
    runs(&server, &uid, &host, "production-v1");
    let repaired_now = repairs(&server, &uid) - repaired;
    assert_eq!(configs_sent(&server), sent + 1 + repaired_now, "sent again, once (plus repairs)");
    assert!(host.state().join("last_recv_remote_config.dat").is_file(), "it has its config again");
    assert_eq!(fixture.send_span(), 200);
    server.stop();
}

#[test]
fn a_host_over_wss_with_a_private_ca_takes_a_rotated_token_and_keeps_verifying_the_server() {
    let _turn = one_host_at_a_time();
    let releases = releases();
    let port = free_port();
    let opamp = format!("127.0.0.1:{port}");
    let web = format!("127.0.0.1:{}", free_port());
    // No [install].endpoint: the fleet dials what --public-url says, wss://.
    let fixture = Fixture::new(None, SUPERVISOR);
    let certificates = tempfile::tempdir().expect("temp dir");
    let trusted = SelfSigned::new(certificates.path(), "gitfleet");
    let (cert, key) = (trusted.cert.display().to_string(), trusted.key.display().to_string());
    let releases_text = releases.display().to_string();
    let public = format!("https://{opamp}");
    let data = tempfile::tempdir().expect("temp dir");
    let serve = |cert: &str, key: &str| {
        let extra = [
            "--tls-cert",
            cert,
            "--tls-key",
            key,
            "--public-url",
            &public,
            "--install-ca-file",
            &trusted.cert.display().to_string(),
            "--artifacts-dir",
            &releases_text,
            "--poll-interval",
            "1h",
        ];
        let mut server = Server::start_on(&opamp, &web, &fixture.path(), data.path(), &extra);
        server.tls = Some(tls_client(&[Path::new(cert)]));
        server
    };
    let server = serve(&cert, &key);
    let old_token = server.token(FLEET);

    let set = install_files(
        data.path(),
        &["--artifacts-dir", &releases_text, "--public-url", &public, "--install-ca-file", &cert],
    );
    let mut host = Host::new();
    host.install_bundle(&set.path().join(format!("gitfleet-{FLEET}-linux-{}.tar.gz", arch())));
    let installed = std::fs::read_to_string(host.config()).expect("installed");
    assert!(installed.contains(&format!("endpoint: \"wss://{opamp}/v1/opamp\"")), "{installed}");
    assert!(
        installed.contains(&format!("ca_file: {}/etc/gitfleet-collector/ca.pem", host.prefix.display())),
        "{installed}"
    );
    assert_eq!(
        std::fs::read_to_string(host.prefix.join("etc/gitfleet-collector/ca.pem")).expect("ca.pem"),
        std::fs::read_to_string(&trusted.cert).expect("the CA")
    );
    host.start();
    let uid = host.instance_uid();
    let first = in_sync_at(&server, &uid, &host, "gateway/v1");
    assert_eq!(first["token_id"], old_token.split('.').next().expect("id"));
    assert_eq!(first["transport"], "websocket");
    runs(&server, &uid, &host, "production-v1");
    assert_eq!(fixture.send_span(), 200);
    fixture.backend.wait_for_traces_with("production-v1", &host);

    // A rotation: the Supervisor is offered the new token over OpAMP and moves to it.
    fixture.roll_out("v1", 1);
    let new_token = server.new_token(FLEET, &old_token);
    let new_id = new_token.split('.').next().expect("id").to_owned();
    instance(&server, &uid, &host, "on the new token", |i| {
        i["token_id"] == new_id.as_str() && i["token_current"] == true && i["connected"] == true
    });
    // Past the old token's grace (6 s) it keeps working, with no reinstall.
    std::thread::sleep(Duration::from_secs(8));
    let fleet = server.json(&format!("/api/v1/fleets/{FLEET}"));
    let old_id = old_token.split('.').next().expect("id");
    let old_state = fleet["tokens"].as_array().and_then(|tokens| tokens.iter().find(|t| t["id"] == old_id)).cloned();
    assert_eq!(old_state.map(|t| t["state"].clone()), Some(Value::from("retired")), "{fleet:#}");
    let seen = server.json(&format!("/api/v1/instances/{uid}"))["last_seen"].clone();
    instance(&server, &uid, &host, "still in sync after the grace", |i| {
        i["status"] == "in_sync" && i["connected"] == true && i["token_id"] == new_id.as_str()
    });
    assert_eq!(fixture.send_span(), 200);

    // The offer kept the server's certificate checked: a server with another certificate
    // on the same address is refused...
    assert_eq!(server.stop(), Some(0));
    let impostor = SelfSigned::new(certificates.path(), "impostor");
    let server = serve(&impostor.cert.display().to_string(), &impostor.key.display().to_string());
    let connected = || server.json(&format!("/api/v1/instances/{uid}"))["connected"] == true;
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&server, "gitfleet_tls_handshake_failures_total") == 0 && !connected() {
        assert!(Instant::now() < deadline, "the Supervisor never came back; supervisor:\n{}", host.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    let refused = server.json(&format!("/api/v1/instances/{uid}"));
    assert_eq!(refused["connected"], false, "it trusted a certificate its CA did not sign: {refused:#}");
    assert_eq!(refused["last_seen"], seen.clone(), "nothing heard through the impostor");
    assert!(metric(&server, "gitfleet_tls_handshake_failures_total") > 0, "its handshakes were refused");
    // ...and the real one is taken back, on the new token it was offered.
    server.stop();
    let server = serve(&cert, &key);
    instance(&server, &uid, &host, "back on the trusted server", |i| {
        i["connected"] == true && i["status"] == "in_sync" && i["token_id"] == new_id.as_str()
    });
    server.stop();
}

#[test]
fn the_oldest_supported_supervisor_runs_the_files_written_for_it() {
    let _turn = one_host_at_a_time();
    let releases = releases();
    let opamp = format!("127.0.0.1:{}", free_port());
    let fixture = Fixture::new(Some(format!("ws://{opamp}/v1/opamp")), OLDEST_SUPERVISOR);
    let data = tempfile::tempdir().expect("temp dir");
    let releases_text = releases.display().to_string();
    let extra = ["--artifacts-dir", &releases_text, "--poll-interval", "1h"];
    let server = Server::start_on(&opamp, "127.0.0.1:0", &fixture.path(), data.path(), &extra);
    server.token(FLEET);

    let set = install_files(data.path(), &["--artifacts-dir", &releases_text]);
    let mut host = Host::new();
    host.install_bundle(&set.path().join(format!("gitfleet-{FLEET}-linux-{}.tar.gz", arch())));
    let installed = std::fs::read_to_string(host.config()).expect("installed");
    assert!(installed.starts_with(&format!("# opampsupervisor {OLDEST_SUPERVISOR} configuration")), "{installed}");
    assert!(installed.contains("\n  validate_config: true\n"), "{installed}");

    // What the newer releases are given would stop this one: it loads its file strictly.
    let newer = installed.replace(
        "  validate_config: true\n",
        "  validate_config: true\n  collector_crash_log_snippet_kib: 4\n  automatic_config_rollback: true\n",
    );
    let newer_path = host.dir.path().join("newer.yaml");
    std::fs::write(&newer_path, newer).expect("write");
    let refused = Command::new(host.prefix.join("opt/gitfleet-collector/bin/opampsupervisor"))
        .arg("--config")
        .arg(&newer_path)
        .output()
        .expect("the Supervisor runs");
    let said = format!("{}{}", String::from_utf8_lossy(&refused.stdout), String::from_utf8_lossy(&refused.stderr));
    assert!(!refused.status.success() && said.contains("invalid keys"), "{said}");

    host.start();
    let uid = host.instance_uid();
    in_sync_at(&server, &uid, &host, "gateway/v1");
    assert_eq!(fixture.send_span(), 200);
    fixture.backend.wait_for_traces_with("production-v1", &host);

    // Its failures are reported too, and a rollback in Git brings it back.
    let refused = fixture
        .gateway("production-v2")
        .replace("    send_batch_size: 8192\n", "    send_batch_size: 8192\n    send_batch_max_size: 100\n");
    fixture.publish("v2", &refused);
    fixture.roll_out("v2", 0);
    let failed =
        instance(&server, &uid, &host, "v2 failed", |i| i["status"] == "failed" && i["assigned_tag"] == "gateway/v2");
    assert!(
        failed["error"]
            .as_str()
            .is_some_and(|e| e.contains("send_batch_max_size must be greater or equal to send_batch_size")),
        "{failed:#}"
    );
    fixture.roll_out("v1", 0);
    in_sync_at(&server, &uid, &host, "gateway/v1");
    server.stop();
}

#[test]
fn the_collector_takes_the_pipeline_the_supervisor_may_bootstrap_it_with() {
    // When the Supervisor's probe of the collector's feature gates misses
    // service.AllowNoPipelines (it does, now and then), it bootstraps the collector with a
    // pipeline of `nop` components; a collector without them exits, and the Supervisor
    // with it ("collector's OpAMP client never connected").
    let releases = releases();
    let work = tempfile::tempdir().expect("temp dir");
    let archive = releases.join(format!("otelcol-contrib_{COLLECTOR}_linux_{}.tar.gz", arch()));
    let status = Command::new("tar").arg("-xzf").arg(&archive).arg("-C").arg(work.path()).status().expect("tar runs");
    assert!(status.success());
    let config = work.path().join("bootstrap.yaml");
    let pipeline = "receivers:\n  nop:\nexporters:\n  nop:\nservice:\n  pipelines:\n    traces:\n      receivers: [nop]\n      exporters: [nop]\n";
    std::fs::write(&config, pipeline).expect("write");
    let output = Command::new(work.path().join("otelcol-contrib"))
        .arg("validate")
        .arg("--config")
        .arg(&config)
        .output()
        .expect("the collector runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}

/// This machine's name, which the Supervisor reports as `host.name`.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").expect("the host name").trim().to_owned()
}

#[test]
fn a_real_collector_as_the_canary_holds_the_fleet_and_a_failure_rolls_it_back() {
    use crate::rollout::{APPLIED, Agent};
    let _turn = one_host_at_a_time();
    let releases = releases();
    let opamp = format!("127.0.0.1:{}", free_port());
    let fixture = Fixture::new(Some(format!("ws://{opamp}/v1/opamp")), SUPERVISOR);
    // The canary is this machine's collector, labelled so by its install; the rest of the
    // fleet is two scripted agents on hosts of the same name pattern.
    let steps = format!(
        "[rollout]\nbake = \"2s\"\non_failure = \"rollback\"\n\
         [[rollout.steps]]\nname = \"canary\"\nhost = \"{}*\"\nattributes = {{ ring = \"canary\" }}\nmax = 1\n\
         [[rollout.steps]]\nname = \"rest\"\nhold = true\n",
        host_name()
    );
    fixture.roll_out_in_steps("v1", 0, &steps);
    let data = tempfile::tempdir().expect("temp dir");
    let releases_text = releases.display().to_string();
    let extra = ["--artifacts-dir", &releases_text, "--poll-interval", "1h"];
    let server = Server::start_on(&opamp, "127.0.0.1:0", &fixture.path(), data.path(), &extra);
    server.token(FLEET);
    let set = install_files(data.path(), &["--artifacts-dir", &releases_text]);
    let mut host = Host::new();
    let bundle = set.path().join(format!("gitfleet-{FLEET}-linux-{}.tar.gz", arch()));
    host.install_bundle_with(&bundle, &["--label", "ring=canary"]);
    host.start();
    let uid = host.instance_uid();
    let first = in_sync_at(&server, &uid, &host, "gateway/v1");
    let reported = first["description"]["non_identifying"].to_string();
    assert!(reported.contains("\"ring\",\"canary\""), "the label is reported: {reported}");
    let names: Vec<String> = (1..=2).map(|n| format!("{}-{n}", host_name())).collect();
    let mut rest: Vec<Agent> =
        names.iter().zip(1..).map(|(name, n)| Agent::connect_to(&server, FLEET, n, name).0).collect();

    // v2: the real collector takes it first; the rest wait for a commit.
    fixture.publish("v2", &fixture.gateway("production-v2"));
    fixture.roll_out_in_steps("v2", 0, &steps);
    let canary = in_sync_at(&server, &uid, &host, "gateway/v2");
    assert_eq!(canary["assigned_because"], "step 1", "{canary:#}");
    runs(&server, &uid, &host, "production-v2");
    let fleet = format!("/api/v1/fleets/{FLEET}");
    server.wait_for(&fleet, CONVERGE, "the rollout held", |f| f["rollout"]["state"] == "held");
    let held = server.json(&format!("/api/v1/instances/{}", crate::opamp::uid_text(rest[0].uid)));
    assert_eq!((held["assigned_tag"].as_str(), held["assigned_because"].as_str()), (Some("gateway/v1"), Some("held")));
    assert_eq!(fixture.send_span(), 200);
    fixture.backend.wait_for_traces_with("production-v2", &host);

    // The approval: the rest follow, and the rollout completes.
    fixture.roll_out_in_steps("v2", 0, &steps.replace("bake = \"2s\"", "bake = \"2s\"\nrelease = 1"));
    let v2 = rest[0].take_push(APPLIED, "");
    assert_eq!(rest[1].take_push(APPLIED, ""), v2);
    server.wait_for(&fleet, CONVERGE, "the rollout complete", |f| f["rollout"]["state"] == "complete");

    // v3 validates but cannot start on the canary (its port is taken): the Supervisor
    // reports it failed, the rollout rolls back, and the canary is sent v2 again. The rest
    // never see v3.
    let taken = TcpListener::bind("127.0.0.1:0").expect("hold a port");
    fixture.publish("v3", &fixture.crashing("production-v3", &taken));
    fixture.roll_out_in_steps("v3", 0, &steps.replace("bake = \"2s\"", "bake = \"2s\"\nrelease = 1"));
    let back = instance(&server, &uid, &host, "rolled back to v2", |i| {
        i["assigned_tag"] == "gateway/v2" && i["assigned_because"] == "rollback" && i["status"] == "in_sync"
    });
    assert!(
        back["events"]
            .as_array()
            .is_some_and(|events| events.iter().any(|e| e["kind"] == "assigned" && e["tag"] == "gateway/v3")),
        "{back:#}"
    );
    let rollout = server.json(&fleet)["rollout"].clone();
    assert_eq!(rollout["state"], "rolled_back");
    let reason = rollout["reason"].as_str().expect("a reason");
    assert!(reason.starts_with("rolled back to gateway/v2 at step 1/2 (canary): 1 of 1"), "{reason}");
    runs(&server, &uid, &host, "production-v2");
    assert_eq!(fixture.send_span(), 200, "v2 runs again");
    for agent in &rest {
        let row = server.json(&format!("/api/v1/instances/{}", crate::opamp::uid_text(agent.uid)));
        assert_eq!(row["assigned_tag"], "gateway/v2", "{row:#}");
    }
    drop(taken);
    rest.clear();
    server.stop();
}
