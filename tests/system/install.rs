//! Install files end to end: served to the fleet's current token only, regenerated when the
//! fleet file changes, exported by `gitfleet install-files`, checked by shellcheck and
//! systemd-analyze, and `install.sh` run for real from an offline bundle into a prefix.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use gitfleet::repo::yaml::{self, Node};
use sha2::{Digest, Sha256};

use tempfile::TempDir;

use crate::common::{GitRepo, SelfSigned, Server, example, gitfleet, http};

const WAIT: Duration = Duration::from_secs(15);
const TEXT_FILES: [&str; 6] =
    ["supervisor.yaml", "install.sh", "gitfleet-collector.service", "Dockerfile", "compose.yaml", "README.txt"];

/// Stand-ins for the official release files of 0.158.0 (what the example pins), with
/// checksums files named as the releases name them.
fn artifacts(dir: &Path) {
    let stage = dir.join("stage");
    std::fs::create_dir_all(&stage).expect("stage dir");
    let mut collector_sums = String::new();
    let mut supervisor_sums = String::new();
    for arch in ["amd64", "arm64"] {
        let binary = stage.join("otelcol-contrib");
        std::fs::write(&binary, format!("#!/bin/sh\necho otelcol-contrib stand-in {arch}\n")).expect("write");
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let archive = format!("otelcol-contrib_0.158.0_linux_{arch}.tar.gz");
        let status = Command::new("tar")
            .args(["-czf"])
            .arg(dir.join(&archive))
            .arg("-C")
            .arg(&stage)
            .arg("otelcol-contrib")
            .status()
            .expect("tar runs");
        assert!(status.success());
        let supervisor = format!("opampsupervisor_0.158.0_linux_{arch}");
        std::fs::write(dir.join(&supervisor), format!("#!/bin/sh\necho opampsupervisor stand-in {arch}\n"))
            .expect("write");
        collector_sums.push_str(&format!("{}  {archive}\n", sha256(&dir.join(&archive))));
        supervisor_sums.push_str(&format!("{}  {supervisor}\n", sha256(&dir.join(&supervisor))));
    }
    std::fs::remove_dir_all(&stage).expect("remove stage");
    std::fs::write(dir.join("opentelemetry-collector-releases_otelcol-contrib_checksums.txt"), collector_sums)
        .expect("write");
    std::fs::write(dir.join("checksums.txt"), supervisor_sums).expect("write");
}

fn sha256(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).expect("read")))
}

fn download(server: &Server, token: &str, file: &str) -> crate::common::Response {
    let authorization = format!("Bearer {token}");
    http(server.opamp, "GET", &format!("/v1/install/{file}"), &[("Authorization", &authorization)], b"")
}

/// Waits until `file` is served (the files are written just after the token is issued).
fn fetch(server: &Server, token: &str, file: &str) -> Vec<u8> {
    let deadline = Instant::now() + WAIT;
    loop {
        let response = download(server, token, file);
        if response.status == 200 {
            return response.bytes;
        }
        assert!(Instant::now() < deadline, "{file}: {} {}\nlogs:\n{}", response.status, response.body, server.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn run(command: &mut Command) -> (bool, String) {
    let output = command.output().expect("the command runs");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

fn scalar<'a>(node: &'a Node, path: &[&str]) -> &'a str {
    let mut current = node;
    for key in path {
        current = current.get(key).unwrap_or_else(|| panic!("no key {path:?}"));
    }
    current.as_str().unwrap_or_else(|| panic!("{path:?} is not a scalar"))
}

/// The example repository served with stand-in release files, a public URL and a private
/// CA for collectors to trust.
struct Setup {
    repo: GitRepo,
    data: TempDir,
    releases: TempDir,
    /// Holds `ca.crt`, given as `--install-ca-file`.
    ca: TempDir,
    server: Server,
}

fn start() -> Setup {
    let repo = example();
    let data = tempfile::tempdir().expect("temp dir");
    let releases = tempfile::tempdir().expect("temp dir");
    artifacts(releases.path());
    let ca = tempfile::tempdir().expect("temp dir");
    let ca_file = SelfSigned::new(ca.path(), "ca").cert.display().to_string();
    let artifacts_dir = releases.path().display().to_string();
    let extra = [
        ["--poll-interval", "1h"],
        ["--artifacts-dir", &artifacts_dir],
        ["--public-url", "https://fleet.example.com:4320"],
        ["--install-ca-file", &ca_file],
    ]
    .concat();
    let server = Server::start(&repo.path().display().to_string(), data.path(), &extra);
    Setup { repo, data, releases, ca, server }
}

#[test]
fn install_files_are_served_to_the_current_token_and_follow_the_fleet_file() {
    let Setup { repo, data, releases: _releases, ca, server } = start();
    let token = server.token("prod-gateway");

    for file in TEXT_FILES.iter().copied().chain(["gitfleet-prod-gateway-linux-amd64.tar.gz"]) {
        let body = fetch(&server, &token, file);
        assert!(!body.is_empty(), "{file}");
    }
    let served = download(&server, &token, "supervisor.yaml");
    assert_eq!(served.header("content-type").as_deref(), Some("application/yaml"));

    // On disk: directory 0700, every file 0600.
    let dir = data.path().join("install/prod-gateway");
    assert_eq!(std::fs::metadata(&dir).expect("dir").permissions().mode() & 0o777, 0o700);
    for entry in std::fs::read_dir(&dir).expect("list") {
        let entry = entry.expect("entry");
        let mode = entry.metadata().expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{:?}", entry.file_name());
    }

    // supervisor.yaml, key by key (opamp.md §4.1).
    let yaml = yaml::parse(&served.body).expect("valid YAML").expect("a document");
    assert_eq!(scalar(&yaml, &["server", "endpoint"]), "ws://127.0.0.1:4320/v1/opamp", "the fleet's own endpoint");
    let authorization = yaml.get("server").and_then(|s| s.get("headers")).and_then(|h| h.get("Authorization"));
    let values = authorization.and_then(Node::as_sequence).expect("a list of header values");
    assert_eq!(values.len(), 1);
    assert_eq!(values[0].as_str(), Some(format!("Bearer {token}").as_str()));
    assert!(yaml.get("server").and_then(|s| s.get("tls")).is_none(), "no TLS settings for ws://");
    for key in [
        "accepts_remote_config",
        "reports_remote_config",
        "reports_effective_config",
        "reports_health",
        "reports_heartbeat",
        "accepts_opamp_connection_settings",
    ] {
        assert_eq!(scalar(&yaml, &["capabilities", key]), "true", "capabilities.{key}");
    }
    assert_eq!(scalar(&yaml, &["storage", "directory"]), "/var/lib/gitfleet-collector");
    assert_eq!(scalar(&yaml, &["agent", "executable"]), "/opt/gitfleet-collector/bin/otelcol-contrib");
    assert_eq!(
        scalar(&yaml, &["agent", "description", "non_identifying_attributes", "gitfleet.fleet"]),
        "prod-gateway"
    );

    // compose.yaml: a restart policy and a volume for the supervisor's storage.
    let compose = yaml::parse(&download(&server, &token, "compose.yaml").body).expect("YAML").expect("document");
    let collector = compose.get("services").and_then(|s| s.get("collector")).expect("services.collector");
    assert_eq!(collector.get("restart").and_then(Node::as_str), Some("unless-stopped"));
    assert_eq!(collector.get("build").and_then(Node::as_str), Some("."));
    let volumes = collector.get("volumes").and_then(Node::as_sequence).expect("volumes");
    assert_eq!(volumes[0].as_str(), Some("supervisor-storage:/var/lib/gitfleet-collector"));
    assert!(compose.get("volumes").and_then(|v| v.get("supervisor-storage")).is_some(), "the named volume");
    let dockerfile = download(&server, &token, "Dockerfile").body;
    assert!(
        dockerfile.contains("ARG COLLECTOR_VERSION=0.158.0") && dockerfile.contains("sha256sum -c"),
        "{dockerfile}"
    );

    // A fleet without `[install].endpoint` dials --public-url, over TLS.
    let nodes = server.token("nodes");
    let nodes_yaml = String::from_utf8(fetch(&server, &nodes, "supervisor.yaml")).expect("UTF-8");
    let nodes_yaml = yaml::parse(&nodes_yaml).expect("YAML").expect("document");
    assert_eq!(scalar(&nodes_yaml, &["server", "endpoint"]), "wss://fleet.example.com:4320/v1/opamp");
    assert_eq!(scalar(&nodes_yaml, &["server", "tls", "insecure_skip_verify"]), "false");
    // With the private CA the set holds, for this TLS endpoint only.
    assert_eq!(scalar(&nodes_yaml, &["server", "tls", "ca_file"]), "/etc/gitfleet-collector/ca.pem");
    let ca_pem = std::fs::read(ca.path().join("ca.crt")).expect("the CA file");
    assert_eq!(fetch(&server, &nodes, "ca.pem"), ca_pem);
    assert_eq!(download(&server, &token, "ca.pem").status, 404, "prod dials ws://: no CA in its set");

    // Refused: no token, a wrong one, another fleet's files, anything outside the set.
    assert_eq!(http(server.opamp, "GET", "/v1/install/install.sh", &[], b"").status, 401);
    assert_eq!(download(&server, "tk_00000000.0000", "install.sh").status, 401);
    assert_eq!(download(&server, &nodes, "gitfleet-prod-gateway-linux-amd64.tar.gz").status, 404);
    for path in
        ["token", ".fingerprint", "..%2Ftoken", "%2e%2e%2f%2e%2e%2fstate.db", "..", "x/../token", "../../state.db"]
    {
        let status = download(&server, &token, path).status;
        assert!(status == 404, "{path}: {status}");
    }

    // Changing `[install]` regenerates the files; a rotation gives them the new token, and
    // the old one no longer downloads anything.
    let fleet_file = std::fs::read_to_string(repo.path().join("fleets/prod-gateway.toml")).expect("read");
    let fleet_file = fleet_file
        .replace("collector_version  = \"0.158.0\"", "collector_version  = \"0.159.0\"")
        .replace("rotate  = 0", "rotate  = 1");
    repo.write("fleets/prod-gateway.toml", fleet_file);
    repo.commit("prod: collector 0.159.0 and a new token");
    let new = server.new_token("prod-gateway", &token);
    let deadline = Instant::now() + WAIT;
    loop {
        let script = download(&server, &new, "install.sh");
        let yaml = download(&server, &new, "supervisor.yaml");
        if script.body.contains("COLLECTOR_VERSION='0.159.0'") && yaml.body.contains(&new) {
            break;
        }
        assert!(Instant::now() < deadline, "install files not regenerated:\n{}", script.body);
        std::thread::sleep(Duration::from_millis(50));
    }
    let old = download(&server, &token, "install.sh");
    assert_eq!(old.status, 401, "a token in its grace period does not download the new token");
    assert!(old.body.contains("current token"), "{}", old.body);
    let logs = server.logs();
    for secret in [&token, &new] {
        assert!(!logs.contains(secret.split_once('.').expect("id.secret").1), "a token in the logs");
    }
    server.stop();
}

#[test]
fn install_sh_from_an_offline_bundle_installs_updates_nothing_and_uninstalls() {
    // Bound, not `..`: the temporary directories must outlive the server.
    let Setup { repo: _repo, data: _data, releases: _releases, ca, server } = start();
    let token = server.token("prod-gateway");
    let work = tempfile::tempdir().expect("temp dir");
    let bundle = work.path().join("bundle.tar.gz");
    std::fs::write(&bundle, fetch(&server, &token, "gitfleet-prod-gateway-linux-amd64.tar.gz")).expect("write");
    // `nodes` dials wss:// (from --public-url): its install.sh carries the private CA.
    let nodes_script = fetch(&server, &server.token("nodes"), "install.sh");
    server.stop();

    let (ok, out) = run(Command::new("tar").arg("-xzf").arg(&bundle).arg("-C").arg(work.path()));
    assert!(ok, "{out}");
    let unpacked = work.path().join("gitfleet-prod-gateway-linux-amd64");
    for name in TEXT_FILES.iter().copied().chain([
        "SHA256SUMS",
        "otelcol-contrib_0.158.0_linux_amd64.tar.gz",
        "opampsupervisor_0.158.0_linux_amd64",
    ]) {
        assert!(unpacked.join(name).is_file(), "{name} is in the bundle");
    }
    let script = unpacked.join("install.sh");
    let (ok, out) = run(Command::new("shellcheck").arg(&script));
    assert!(ok, "shellcheck:\n{out}");

    let prefix = work.path().join("root");
    // Always under --prefix: these tests may run as root.
    let install = |extra: &[&str]| {
        run(Command::new("sh").arg(&script).arg("--prefix").arg(&prefix).args(["--arch", "amd64"]).args(extra))
    };
    let (ok, out) = install(&[]);
    assert!(ok, "{out}");
    assert!(out.contains("using the release files of the bundle"), "{out}");
    let bin = prefix.join("opt/gitfleet-collector/bin");
    let (ok, version) = run(&mut Command::new(bin.join("otelcol-contrib")));
    assert!(ok && version.contains("otelcol-contrib stand-in amd64"), "{version}");
    assert!(bin.join("opampsupervisor").is_file());
    let config = prefix.join("etc/gitfleet-collector/supervisor.yaml");
    assert_eq!(std::fs::metadata(&config).expect("config").permissions().mode() & 0o777, 0o600);
    let config_text = std::fs::read_to_string(&config).expect("read");
    assert!(config_text.contains(&format!("{}/opt/gitfleet-collector/bin/otelcol-contrib", prefix.display())));
    assert!(config_text.contains(&token));
    let state = prefix.join("var/lib/gitfleet-collector");
    assert_eq!(std::fs::metadata(&state).expect("state").permissions().mode() & 0o777, 0o700);
    let unit = prefix.join("etc/systemd/system/gitfleet-collector.service");
    let unit_text = std::fs::read_to_string(&unit).expect("the unit");
    assert!(unit_text.contains(&format!("ExecStart={}/opt/gitfleet-collector/bin/opampsupervisor", prefix.display())));
    let (ok, out) = run(Command::new("systemd-analyze").arg("verify").arg(&unit));
    assert!(ok && out.trim().is_empty(), "systemd-analyze verify:\n{out}");

    // Again: nothing changes.
    let before = std::fs::metadata(bin.join("otelcol-contrib")).and_then(|m| m.modified()).expect("mtime");
    let (ok, out) = install(&[]);
    assert!(ok && out.contains("already up to date; nothing changed"), "{out}");
    assert_eq!(std::fs::metadata(bin.join("otelcol-contrib")).and_then(|m| m.modified()).expect("mtime"), before);

    // Labels, for rollout steps to select by: reported with the fleet's own attribute.
    let (ok, out) = install(&["--label", "ring=canary", "--label=site=eu-west-1"]);
    assert!(ok && out.contains(&format!("installed {}", config.display())), "{out}");
    let labelled = std::fs::read_to_string(&config).expect("read");
    assert!(
        labelled.contains("    non_identifying_attributes:\n      gitfleet.fleet: prod-gateway\n      ring: \"canary\"\n      site: \"eu-west-1\"\n"),
        "{labelled}"
    );
    for (label, refusal) in [
        ("ring", "--label needs KEY=VALUE"),
        ("=canary", "--label key ''"),
        ("ring=can ary", "--label value 'can ary'"),
        ("ring=a\"b", "--label value 'a\"b'"),
        ("gitfleet.fleet=x", "--label gitfleet.fleet is set by gitfleet"),
    ] {
        let (ok, out) = install(&["--label", label]);
        assert!(!ok && out.contains(refusal), "{label}: {out}");
    }
    let (ok, out) = install(&["--label", "ring=a", "--label", "ring=b"]);
    assert!(!ok && out.contains("--label ring is given twice"), "{out}");
    assert_eq!(std::fs::read_to_string(&config).expect("read"), labelled, "a refused run changes nothing");
    let (ok, out) = install(&[]);
    assert!(ok && !std::fs::read_to_string(&config).expect("read").contains("ring:"), "without them, gone: {out}");

    // A fleet of a server with a private CA: install.sh carries the CA and puts it beside
    // the config (here from the same bundle's release files).
    let nodes = unpacked.join("install-nodes.sh");
    std::fs::write(&nodes, nodes_script).expect("write");
    let (ok, out) = run(Command::new("sh").arg(&nodes).arg("--prefix").arg(&prefix).args(["--arch", "amd64"]));
    let installed_ca = prefix.join("etc/gitfleet-collector/ca.pem");
    assert!(ok && out.contains(&format!("installed {}", installed_ca.display())), "{out}");
    assert_eq!(std::fs::metadata(&installed_ca).expect("ca.pem").permissions().mode() & 0o777, 0o644);
    assert_eq!(
        std::fs::read_to_string(&installed_ca).expect("ca.pem"),
        std::fs::read_to_string(ca.path().join("ca.crt")).expect("the CA")
    );
    // `nodes` reads pod logs and every process ([install] of its fleet file): its unit
    // grants that, and only that, and systemd accepts it.
    let unit_text = std::fs::read_to_string(&unit).expect("the unit");
    for line in [
        "AmbientCapabilities=CAP_DAC_READ_SEARCH CAP_SYS_PTRACE\n",
        "CapabilityBoundingSet=CAP_DAC_READ_SEARCH CAP_SYS_PTRACE\n",
        "ProtectProc=default\n",
        "ProtectSystem=strict\n",
        "User=gitfleet-collector\n",
    ] {
        assert!(unit_text.contains(line), "{line:?} in\n{unit_text}");
    }
    let (ok, out) = run(Command::new("systemd-analyze").arg("verify").arg(&unit));
    assert!(ok && out.trim().is_empty(), "systemd-analyze verify of the nodes unit:\n{out}");

    // Uninstall removes the files and keeps the state; a second time there is nothing to do.
    let (ok, out) = install(&["--uninstall"]);
    assert!(ok && out.contains("removed the collector of fleet prod-gateway"), "{out}");
    assert!(!bin.join("opampsupervisor").exists() && !config.exists() && !unit.exists() && !installed_ca.exists());
    assert!(state.is_dir(), "the state is kept");
    let (ok, out) = install(&["--uninstall"]);
    assert!(ok && out.contains("nothing to remove"), "{out}");

    // A release file that does not match its checksum stops it before anything is installed.
    let tampered = unpacked.join("opampsupervisor_0.158.0_linux_amd64");
    let mut bytes = std::fs::read(&tampered).expect("read");
    bytes.extend_from_slice(b"# tampered\n");
    std::fs::write(&tampered, bytes).expect("write");
    let clean = work.path().join("clean");
    let (ok, out) =
        run(Command::new("sh").arg(&script).arg("--prefix").arg(&clean).args(["--arch", "amd64", "--no-systemd"]));
    assert!(!ok, "{out}");
    assert!(
        out.contains("checksum mismatch for opampsupervisor_0.158.0_linux_amd64")
            && out.contains("nothing was installed"),
        "{out}"
    );
    assert!(!clean.exists(), "nothing installed");

    // Bad options are refused clearly.
    let (ok, out) = install(&["--arch", "s390x"]);
    assert!(!ok && out.contains("unsupported --arch 's390x'"), "{out}");
    let (ok, out) = install(&["--frobnicate"]);
    assert!(!ok && out.contains("unknown option '--frobnicate'"), "{out}");
}

#[test]
fn install_files_exports_what_the_server_serves() {
    let Setup { repo: _repo, data, releases, ca: _ca, server } = start();
    let token = server.token("prod-gateway");
    let served = fetch(&server, &token, "supervisor.yaml");
    let nodes_served = fetch(&server, &server.token("nodes"), "supervisor.yaml");
    server.stop();

    let exported = tempfile::tempdir().expect("temp dir");
    let target = exported.path().join("prod");
    let output = gitfleet()
        .args(["install-files", "prod-gateway", "--out"])
        .arg(&target)
        .arg("--data-dir")
        .arg(data.path())
        .arg("--artifacts-dir")
        .arg(releases.path())
        .output()
        .expect("runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let listed = String::from_utf8_lossy(&output.stdout);
    assert_eq!(listed.lines().count(), 8, "{listed}");
    assert_eq!(std::fs::read(target.join("supervisor.yaml")).expect("exported"), served);
    let (ok, out) = run(Command::new("tar").arg("-tzf").arg(target.join("gitfleet-prod-gateway-linux-arm64.tar.gz")));
    assert!(ok && out.contains("gitfleet-prod-gateway-linux-arm64/opampsupervisor_0.158.0_linux_arm64"), "{out}");
    let hidden: Vec<String> = std::fs::read_dir(&target)
        .expect("list")
        .map(|entry| entry.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with('.'))
        .collect();
    assert_eq!(hidden, Vec::<String>::new(), "only the install files are exported");

    // `nodes` names no endpoint: the one the server wrote its files with (from its
    // --public-url) and its CA are reused, with no flag.
    let nodes = exported.path().join("nodes");
    let output =
        gitfleet().args(["install-files", "nodes", "--out"]).arg(&nodes).arg("--data-dir").arg(data.path()).output();
    let output = output.expect("runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(std::fs::read(nodes.join("supervisor.yaml")).expect("exported"), nodes_served);
    assert!(nodes.join("ca.pem").is_file(), "the server's CA for a wss:// fleet");
    // Before the server has written the fleet's files, it must be given.
    std::fs::remove_file(data.path().join("install/nodes/.endpoint")).expect("remove");

    let failures: [(&[&str], &str); 3] = [
        (&["install-files", "no-such-fleet", "--out", "x"], "never served a fleet `no-such-fleet`"),
        (&["install-files", "nodes", "--out", "x"], "give --public-url"),
        (
            &["install-files", "nodes", "--out", "x", "--public-url", "fleet.example.com"],
            "--public-url `fleet.example.com`",
        ),
    ];
    for (args, expected) in failures {
        let output = gitfleet().args(args).arg("--data-dir").arg(data.path()).output().expect("runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    let empty = tempfile::tempdir().expect("temp dir");
    let output = gitfleet()
        .args(["install-files", "prod-gateway", "--out", "x", "--data-dir"])
        .arg(empty.path())
        .output()
        .expect("runs");
    assert!(String::from_utf8_lossy(&output.stderr).contains("no gitfleet state in"), "{output:?}");
}

#[test]
fn install_sh_alone_takes_the_releases_from_the_server_and_stops_cleanly_without_it() {
    let Setup { repo: _repo, data: _data, releases, ca: _ca, server } = start();
    let token = server.token("prod-gateway");
    let work = tempfile::tempdir().expect("temp dir");
    let script = work.path().join("install.sh");
    std::fs::write(&script, fetch(&server, &token, "install.sh")).expect("write");
    // The script downloads from the fleet's endpoint: point it at this test's server.
    let text = std::fs::read_to_string(&script).expect("read");
    let base = text.lines().find(|line| line.starts_with("DOWNLOAD_BASE='")).expect("DOWNLOAD_BASE").to_owned();
    let text = text.replace(&base, &format!("DOWNLOAD_BASE='http://{}/v1/install'", server.opamp));
    std::fs::write(&script, text).expect("write");
    let (ok, out) = run(Command::new("shellcheck").arg(&script));
    assert!(ok, "shellcheck:\n{out}");

    // Alone in a directory, it takes the release files from the server.
    let prefix = work.path().join("root");
    let (ok, out) =
        run(Command::new("sh").arg(&script).arg("--prefix").arg(&prefix).args(["--arch", "amd64", "--no-systemd"]));
    assert!(ok && out.contains("from gitfleet"), "{out}");
    let (ok, version) = run(&mut Command::new(prefix.join("opt/gitfleet-collector/bin/otelcol-contrib")));
    assert!(ok && version.contains("otelcol-contrib stand-in amd64"), "{version}");
    let config = std::fs::read_to_string(prefix.join("etc/gitfleet-collector/supervisor.yaml")).expect("config");
    assert!(config.contains(&token), "the fleet's supervisor.yaml came with the script");

    // The server serves the verified release files of the fleet's pins, to its token only.
    let name = "opampsupervisor_0.158.0_linux_amd64";
    let served = download(&server, &token, name);
    assert_eq!(served.status, 200);
    assert_eq!(served.header("content-type").as_deref(), Some("application/octet-stream"));
    assert_eq!(served.bytes, std::fs::read(releases.path().join(name)).expect("the release file"));
    assert_eq!(download(&server, "tk_00000000.0000", name).status, 401);
    assert_eq!(download(&server, &token, "opampsupervisor_0.157.0_linux_amd64").status, 404, "not a pinned release");
    std::fs::remove_file(releases.path().join(name)).expect("remove");
    let gone = download(&server, &token, name);
    assert_eq!((gone.status, gone.body.trim()), (404, "this release file is no longer on the server"));
    server.stop();

    // Without the server, it says so, tries the official releases (unreachable here: the
    // proxy is a closed port) and stops with nothing installed.
    let elsewhere = work.path().join("elsewhere");
    let (ok, out) = run(Command::new("sh")
        .arg(&script)
        .arg("--prefix")
        .arg(&elsewhere)
        .args(["--arch", "amd64", "--no-systemd"])
        .env("https_proxy", "http://127.0.0.1:9")
        .env("HTTPS_PROXY", "http://127.0.0.1:9"));
    assert!(!ok, "{out}");
    assert!(out.contains("gitfleet did not serve otelcol-contrib_0.158.0_linux_amd64.tar.gz"), "{out}");
    assert!(out.contains("cannot download otelcol-contrib_0.158.0_linux_amd64.tar.gz; nothing was installed"), "{out}");
    assert!(!elsewhere.exists(), "nothing installed");
}
