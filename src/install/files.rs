//! A fleet's install files (PRODUCT.md §6): rendered from the templates in `templates/`,
//! written under `<data-dir>/install/<fleet>/` (directory 0700, files 0600) and packed into
//! one offline bundle per architecture.
//!
//! Rendering is pure; only `write_set` touches the disk. Every value put into a template is
//! checked first: fleet names and versions are safe names, the token is `tk_<hex>.<hex>`, and
//! the endpoint goes into YAML as a quoted string.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::install::artifacts::Artifact;
use crate::install::supervisor::{self, Release};
use crate::install::token::TokenText;
use crate::repo::manifest::Access;

pub const ARCHES: [&str; 2] = ["amd64", "arm64"];
/// Written last: what the set was made from, so an unchanged set is not rewritten.
const FINGERPRINT: &str = ".fingerprint";
/// The release files the server serves with the set: one `<name>\t<path>` per line.
const SERVED_RELEASES: &str = ".releases";
/// The endpoint the server wrote the set with, for `install-files` to reuse.
const ENDPOINT: &str = ".endpoint";

/// What a fleet's install files are made from.
#[derive(Clone, Copy)]
pub struct InstallSpec<'a> {
    pub fleet: &'a str,
    pub token: &'a TokenText,
    /// The OpAMP URL collectors dial.
    pub endpoint: &'a str,
    pub collector_version: &'a str,
    pub supervisor_version: &'a str,
    /// CA certificates (PEM) collectors trust for a `wss://` or `https://` endpoint.
    pub ca: Option<&'a str>,
    /// The verified release files the server serves to this fleet at `/v1/install/<name>`
    /// (from `--artifacts-dir`): `install.sh` downloads them from there.
    pub server_releases: &'a [Artifact],
    /// What the collector may read on its host (`[install]` of the fleet file).
    pub access: &'a Access,
}

/// One rendered file and the mode it gets inside a bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextFile {
    pub name: &'static str,
    pub mode: u32,
    pub body: String,
}

/// The releases a fleet's `[install]` pins (collector, supervisor), or the defaults.
pub fn versions(install: &crate::repo::manifest::InstallSettings) -> (String, String) {
    (
        install.collector_version.clone().unwrap_or_else(|| supervisor::DEFAULT_COLLECTOR.to_string()),
        install.supervisor_version.clone().unwrap_or_else(|| supervisor::DEFAULT.to_string()),
    )
}

/// The release files of one architecture, as the bundle and `install.sh` name them.
pub fn release_files(spec: &InstallSpec<'_>, arch: &str) -> [String; 2] {
    [
        format!("otelcol-contrib_{}_linux_{arch}.tar.gz", spec.collector_version),
        format!("opampsupervisor_{}_linux_{arch}", spec.supervisor_version),
    ]
}

pub fn bundle_name(fleet: &str, arch: &str) -> String {
    format!("gitfleet-{fleet}-linux-{arch}.tar.gz")
}

/// Where `install.sh` and the Docker image put `ca.pem`.
const CA_PATH: &str = "/etc/gitfleet-collector/ca.pem";

/// Every file `GET /v1/install/<file>` may serve for `fleet` (`ca.pem` only when there is one).
pub fn served_names(fleet: &str) -> Vec<String> {
    let mut names: Vec<String> = TEMPLATES.iter().map(|(name, ..)| (*name).to_owned()).collect();
    names.push("ca.pem".to_owned());
    names.extend(ARCHES.iter().map(|arch| bundle_name(fleet, arch)));
    names
}

const TEMPLATES: [(&str, u32, &str); 6] = [
    ("supervisor.yaml", 0o600, include_str!("templates/supervisor.yaml")),
    ("install.sh", 0o755, include_str!("templates/install.sh")),
    ("gitfleet-collector.service", 0o644, include_str!("templates/gitfleet-collector.service")),
    ("Dockerfile", 0o644, include_str!("templates/Dockerfile")),
    ("compose.yaml", 0o644, include_str!("templates/compose.yaml")),
    ("README.txt", 0o644, include_str!("templates/README.txt")),
];

/// The text files of a fleet's install set. `install.sh` carries the rendered
/// `supervisor.yaml`, unit file and CA, so that it needs no other file.
pub fn render(spec: &InstallSpec<'_>) -> Vec<TextFile> {
    let secure = spec.endpoint.starts_with("wss://") || spec.endpoint.starts_with("https://");
    let ca = spec.ca.filter(|_| secure);
    let tls = match (secure, ca) {
        (false, _) => String::new(),
        (true, None) => {
            format!("  tls:\n    insecure_skip_verify: false\n    # ca_file: {CA_PATH}   # for a private CA\n")
        }
        (true, Some(_)) => format!("  tls:\n    insecure_skip_verify: false\n    ca_file: {CA_PATH}\n"),
    };
    let copy_ca = match ca {
        Some(_) => format!("COPY --chmod=0644 ca.pem {CA_PATH}\n"),
        None => String::new(),
    };
    let endpoint_yaml = serde_json::to_string(spec.endpoint).expect("a string serializes");
    // The fleet file's pin was checked when it was read; a pin that does not parse gets only
    // the settings every supported release knows.
    let agent_settings = Release::parse(spec.supervisor_version).map(supervisor::agent_settings).unwrap_or_default();
    let (unit_access, capabilities, protect_proc) = unit_access(spec.access);
    let fill = |name: &str, template: &str| {
        template
            .replace("@ACCESS@", &unit_access)
            .replace("@CAPABILITIES@", &capabilities)
            .replace("@PROTECT_PROC@", protect_proc)
            .replace("@TLS@\n", &tls)
            .replace("@COPY_CA@\n", &copy_ca)
            .replace("@AGENT_SETTINGS@", &agent_settings)
            .replace("@ENDPOINT@", if name == "supervisor.yaml" { &endpoint_yaml } else { spec.endpoint })
            .replace("@DOWNLOAD_BASE@", &download_base(spec.endpoint))
            .replace("@TOKEN@", spec.token.expose())
            .replace("@FLEET@", spec.fleet)
            .replace("@COLLECTOR_VERSION@", spec.collector_version)
            .replace("@SUPERVISOR_VERSION@", spec.supervisor_version)
    };
    let mut files: Vec<TextFile> =
        TEMPLATES.iter().map(|&(name, mode, template)| TextFile { name, mode, body: fill(name, template) }).collect();
    let body_of = |files: &[TextFile], name: &str| {
        files.iter().find(|file| file.name == name).map(|file| file.body.clone()).expect("a template of the set")
    };
    let supervisor_yaml = body_of(&files, "supervisor.yaml");
    let unit = body_of(&files, "gitfleet-collector.service");
    let ca_pem = ca.map(|ca| if ca.ends_with('\n') { ca.to_owned() } else { format!("{ca}\n") });
    let server_releases: String =
        spec.server_releases.iter().map(|release| format!("\n{} {}", release.name, release.sha256)).collect();
    let script = files.iter_mut().find(|file| file.name == "install.sh").expect("install.sh is a template");
    // The embedded files go in last, so that nothing in them is taken for a placeholder.
    script.body = script
        .body
        .replace("@SERVER_RELEASES@", &server_releases)
        .replace("@SUPERVISOR_YAML@", &supervisor_yaml)
        .replace("@SERVICE_UNIT@", &unit)
        .replace("@CA_PEM@", ca_pem.as_deref().unwrap_or_default());
    if let Some(ca) = ca_pem {
        files.push(TextFile { name: "ca.pem", mode: 0o644, body: ca });
    }
    files
}

/// The unit's lines for what the collector may read: extra lines (with a comment saying
/// why), the capabilities, and `ProtectProc`.
fn unit_access(access: &Access) -> (String, String, &'static str) {
    let mut lines = String::new();
    let mut capabilities = Vec::new();
    if !access.groups.is_empty() {
        lines.push_str(&format!(
            "# [install].groups: files these groups may read (the journal, /var/log).\nSupplementaryGroups={}\n",
            access.groups.join(" ")
        ));
    }
    if access.read_all_files {
        lines.push_str("# [install].read_all_files: read any file (logs only root may read), never write one.\n");
        capabilities.push("CAP_DAC_READ_SEARCH");
    }
    let protect_proc = if access.see_processes {
        lines.push_str("# [install].see_processes: see and read every process (hostmetrics' process scrapers).\n");
        capabilities.push("CAP_SYS_PTRACE");
        "default"
    } else {
        "invisible"
    };
    (lines, capabilities.join(" "), protect_proc)
}

/// `https://host:port/v1/install` for an OpAMP endpoint `wss://host:port/v1/opamp`.
fn download_base(endpoint: &str) -> String {
    let (scheme, rest) = endpoint.split_once("://").unwrap_or(("http", endpoint));
    let scheme = if matches!(scheme, "wss" | "https") { "https" } else { "http" };
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    format!("{scheme}://{host}/v1/install")
}

/// What a written set was made from: the rendered files and each artifact's name, size
/// and modification time (hashing large archives on every check would be too slow).
pub fn fingerprint(files: &[TextFile], artifacts: &[PathBuf]) -> String {
    let mut hasher = Sha256::new();
    for file in files {
        hasher.update(file.name.as_bytes());
        hasher.update((file.body.len() as u64).to_be_bytes());
        hasher.update(file.body.as_bytes());
    }
    for path in artifacts {
        hasher.update(path.to_string_lossy().as_bytes());
        if let Ok(meta) = std::fs::metadata(path) {
            hasher.update(meta.len().to_be_bytes());
            let modified = meta.modified().ok().and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok());
            hasher.update(modified.map_or(0, |d| d.as_nanos()).to_be_bytes());
        }
    }
    hex::encode(hasher.finalize())
}

/// Where the release file `name` that the set in `dir` serves is, if it serves one by
/// that name.
pub fn served_release(dir: &Path, name: &str) -> Option<PathBuf> {
    let list = std::fs::read_to_string(dir.join(SERVED_RELEASES)).ok()?;
    list.lines().find_map(|line| {
        let (listed, path) = line.split_once('\t')?;
        (listed == name).then(|| PathBuf::from(path))
    })
}

/// Whether the set in `dir` was written from `fingerprint` (with every file the server
/// keeps beside it).
pub fn is_current(dir: &Path, fingerprint: &str) -> bool {
    std::fs::read_to_string(dir.join(FINGERPRINT)).is_ok_and(|written| written.trim() == fingerprint)
        && dir.join(ENDPOINT).is_file()
}

/// The endpoint the server's set in `dir` dials, if the server has written one.
pub fn written_endpoint(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(ENDPOINT)).ok()?;
    Some(text.trim().to_owned()).filter(|endpoint| !endpoint.is_empty())
}

/// Writes the text files and one bundle per architecture into `dir` (created 0700; every
/// file 0600, replaced atomically). `artifacts` holds each architecture's verified release
/// files, if the server has them. For the server's own set (`fingerprint` given), also what
/// it keeps beside the files: the release files it serves, the endpoint, and last the
/// fingerprint; an exported set is only the files.
pub fn write_set(
    dir: &Path,
    spec: &InstallSpec<'_>,
    files: &[TextFile],
    artifacts: &[(&str, Vec<Artifact>)],
    fingerprint: Option<&str>,
) -> std::io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    for file in files {
        write_private(dir, file.name, |out| out.write_all(file.body.as_bytes()))?;
    }
    // The one optional file: gone from the set (no CA any more, or a plain endpoint), gone
    // from the disk, so that it is not served.
    if !files.iter().any(|file| file.name == "ca.pem") {
        match std::fs::remove_file(dir.join("ca.pem")) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
            _ => {}
        }
    }
    let mtime = crate::time::now_unix().max(0) as u64;
    for arch in ARCHES {
        let included = artifacts.iter().find(|(a, _)| *a == arch).map(|(_, list)| list.as_slice()).unwrap_or_default();
        let name = bundle_name(spec.fleet, arch);
        write_private(dir, &name, |out| crate::install::bundle::write(out, spec.fleet, arch, files, included, mtime))?;
    }
    let Some(fingerprint) = fingerprint else { return Ok(()) };
    let served: String =
        spec.server_releases.iter().map(|release| format!("{}\t{}\n", release.name, release.path.display())).collect();
    write_private(dir, SERVED_RELEASES, |out| out.write_all(served.as_bytes()))?;
    write_private(dir, ENDPOINT, |out| writeln!(out, "{}", spec.endpoint))?;
    write_private(dir, FINGERPRINT, |out| out.write_all(fingerprint.as_bytes()))
}

fn write_private(
    dir: &Path,
    name: &str,
    fill: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let temporary = dir.join(format!(".{name}.tmp"));
    let file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&temporary)?;
    let mut out = std::io::BufWriter::new(file);
    fill(&mut out)?;
    let file = out.into_inner().map_err(std::io::IntoInnerError::into_error)?;
    file.sync_all()?;
    std::fs::rename(&temporary, dir.join(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::install::token;

    fn spec<'a>(token: &'a TokenText, endpoint: &'a str) -> InstallSpec<'a> {
        InstallSpec {
            fleet: "prod-gateway",
            token,
            endpoint,
            collector_version: "0.115.0",
            supervisor_version: "0.158.0",
            ca: None,
            server_releases: &[],
            access: &NO_ACCESS,
        }
    }

    static NO_ACCESS: Access = Access { groups: Vec::new(), read_all_files: false, see_processes: false };

    #[test]
    fn the_unit_grants_what_the_fleet_file_asks_for() {
        let (text, _) = token::issue("nodes", 0, 0).expect("random");
        let unit = |access: &Access| {
            let files = render(&InstallSpec { access, ..spec(&text, "ws://10.0.0.1:4320/v1/opamp") });
            files.into_iter().find(|f| f.name == "gitfleet-collector.service").expect("the unit").body
        };
        let hardened = unit(&NO_ACCESS);
        for line in ["CapabilityBoundingSet=\n", "AmbientCapabilities=\n", "ProtectProc=invisible\n"] {
            assert!(hardened.contains(line), "{line:?} in\n{hardened}");
        }
        assert!(!hardened.contains("SupplementaryGroups"));
        let node_agent = unit(&Access {
            groups: vec!["systemd-journal".into(), "adm".into()],
            read_all_files: true,
            see_processes: true,
        });
        for line in [
            "SupplementaryGroups=systemd-journal adm\n",
            "CapabilityBoundingSet=CAP_DAC_READ_SEARCH CAP_SYS_PTRACE\n",
            "AmbientCapabilities=CAP_DAC_READ_SEARCH CAP_SYS_PTRACE\n",
            "ProtectProc=default\n",
            "ProtectSystem=strict\n",
            "NoNewPrivileges=yes\n",
        ] {
            assert!(node_agent.contains(line), "{line:?} in\n{node_agent}");
        }
    }

    #[test]
    fn every_placeholder_is_filled() {
        let (text, _) = token::issue("prod-gateway", 0, 0).expect("random");
        for endpoint in ["ws://10.0.0.1:4320/v1/opamp", "wss://fleet.example.com:4320/v1/opamp"] {
            for file in render(&spec(&text, endpoint)) {
                let ats: Vec<usize> = file.body.match_indices('@').map(|(i, _)| i).collect();
                let placeholder = ats
                    .windows(2)
                    .map(|w| &file.body[w[0] + 1..w[1]])
                    .find(|word| !word.is_empty() && word.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'));
                assert_eq!(placeholder, None, "{} keeps a placeholder:\n{}", file.name, file.body);
            }
        }
    }

    #[test]
    fn only_supervisor_yaml_and_install_sh_hold_the_token_and_tls_follows_the_scheme() {
        let (text, _) = token::issue("prod-gateway", 0, 0).expect("random");
        let files = render(&spec(&text, "wss://fleet.example.com:4320/v1/opamp"));
        for file in &files {
            let holds = matches!(file.name, "supervisor.yaml" | "install.sh");
            assert_eq!(file.body.contains(text.expose()), holds, "{}", file.name);
        }
        let yaml = &files.iter().find(|f| f.name == "supervisor.yaml").expect("supervisor.yaml").body;
        assert!(yaml.contains("endpoint: \"wss://fleet.example.com:4320/v1/opamp\""), "{yaml}");
        assert!(yaml.contains("insecure_skip_verify: false"), "{yaml}");
        let readme = &files.iter().find(|f| f.name == "README.txt").expect("README").body;
        assert!(readme.contains("https://fleet.example.com:4320/v1/install/<file>"), "{readme}");
        let plain = render(&spec(&text, "ws://10.0.0.1:4320/v1/opamp"));
        let yaml = &plain.iter().find(|f| f.name == "supervisor.yaml").expect("supervisor.yaml").body;
        assert!(!yaml.contains("tls:"), "{yaml}");
    }

    #[test]
    fn install_sh_carries_the_set_and_the_release_files_the_server_serves() {
        let (text, _) = token::issue("prod-gateway", 0, 0).expect("random");
        let releases = [Artifact {
            name: "opampsupervisor_0.158.0_linux_amd64".into(),
            path: PathBuf::from("/srv/releases/opampsupervisor_0.158.0_linux_amd64"),
            sha256: "ab".repeat(32),
        }];
        let ca = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----";
        let files = render(&InstallSpec {
            ca: Some(ca),
            server_releases: &releases,
            ..spec(&text, "wss://fleet.example.com:4320/v1/opamp")
        });
        let body = |name: &str| files.iter().find(|f| f.name == name).map(|f| f.body.clone()).expect(name);
        let script = body("install.sh");
        let embedded = |delimiter: &str| {
            let start = script.find(&format!("<<'{delimiter}'\n")).expect(delimiter) + delimiter.len() + 5;
            let end = script[start..].find(&format!("\n{delimiter}\n")).expect("closed") + start + 1;
            script[start..end].to_owned()
        };
        assert_eq!(embedded("GITFLEET_SUPERVISOR_YAML"), body("supervisor.yaml"));
        assert_eq!(embedded("GITFLEET_SERVICE_UNIT"), body("gitfleet-collector.service"));
        assert_eq!(embedded("GITFLEET_CA_PEM"), format!("{ca}\n"), "a PEM without a final newline gets one");
        assert_eq!(body("ca.pem"), format!("{ca}\n"));
        assert!(script.contains(&format!("\nopampsupervisor_0.158.0_linux_amd64 {}'\n", "ab".repeat(32))), "{script}");
        assert!(script.contains("\nDOWNLOAD_BASE='https://fleet.example.com:4320/v1/install'\n"), "{script}");
        assert!(!script.contains("/srv/releases"), "paths on the server stay there");
        let plain = render(&spec(&text, "ws://10.0.0.1:4320/v1/opamp"));
        let script = &plain.iter().find(|f| f.name == "install.sh").expect("install.sh").body;
        assert!(script.contains("<<'GITFLEET_CA_PEM'\nGITFLEET_CA_PEM\n"), "no CA: an empty file");
        assert!(script.contains("\nSERVER_RELEASES=''\n"), "{script}");
    }

    #[test]
    fn a_private_ca_goes_with_secure_endpoints_only() {
        let (text, _) = token::issue("prod-gateway", 0, 0).expect("random");
        let ca = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let file = |files: &[TextFile], name: &str| files.iter().find(|f| f.name == name).map(|f| f.body.clone());
        let secure = render(&InstallSpec { ca: Some(ca), ..spec(&text, "wss://fleet.example.com:4320/v1/opamp") });
        let yaml = file(&secure, "supervisor.yaml").expect("supervisor.yaml");
        assert!(yaml.contains("\n    ca_file: /etc/gitfleet-collector/ca.pem\n"), "{yaml}");
        assert_eq!(file(&secure, "ca.pem").as_deref(), Some(ca));
        assert_eq!(secure.iter().find(|f| f.name == "ca.pem").map(|f| f.mode), Some(0o644));
        let dockerfile = file(&secure, "Dockerfile").expect("Dockerfile");
        assert!(dockerfile.contains("\nCOPY --chmod=0644 ca.pem /etc/gitfleet-collector/ca.pem\n"), "{dockerfile}");

        let plain = render(&InstallSpec { ca: Some(ca), ..spec(&text, "ws://10.0.0.1:4320/v1/opamp") });
        assert_eq!(file(&plain, "ca.pem"), None);
        assert!(!file(&plain, "Dockerfile").expect("Dockerfile").contains("ca.pem"));
        let without = render(&spec(&text, "wss://fleet.example.com:4320/v1/opamp"));
        assert!(file(&without, "supervisor.yaml").expect("yaml").contains("# ca_file:"), "a hint, commented out");
        assert!(!file(&without, "Dockerfile").expect("Dockerfile").contains("ca.pem"));
    }

    #[test]
    fn supervisor_yaml_holds_only_keys_the_pinned_release_knows() {
        let (text, _) = token::issue("prod-gateway", 0, 0).expect("random");
        let yaml = |version: &str| {
            let files =
                render(&InstallSpec { supervisor_version: version, ..spec(&text, "ws://10.0.0.1:4320/v1/opamp") });
            files.into_iter().find(|f| f.name == "supervisor.yaml").expect("supervisor.yaml").body
        };
        let oldest = yaml("0.149.0");
        let current = yaml("0.158.0");
        for body in [&oldest, &current] {
            assert!(body.contains("\n  reports_available_components: true\n"), "{body}");
            assert!(body.contains("\n  validate_config: true\n"), "{body}");
        }
        for key in ["collector_crash_log_snippet_kib", "automatic_config_rollback"] {
            assert!(!oldest.contains(key), "0.149.0 refuses {key}:\n{oldest}");
            assert!(current.contains(&format!("\n  {key}: ")), "{current}");
        }
        assert!(current.starts_with("# opampsupervisor 0.158.0 configuration"), "{current}");
        assert!(current.contains("\n  description:\n    non_identifying_attributes:\n"), "{current}");
    }

    #[test]
    fn served_names_are_the_templates_and_the_bundles() {
        let names = served_names("prod");
        assert!(names.contains(&"install.sh".to_owned()));
        assert!(names.contains(&"gitfleet-prod-linux-arm64.tar.gz".to_owned()));
        assert!(!names.iter().any(|n| n == "token" || n.starts_with('.')));
    }
}
