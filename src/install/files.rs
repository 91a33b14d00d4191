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

pub const ARCHES: [&str; 2] = ["amd64", "arm64"];
/// Written last: what the set was made from, so an unchanged set is not rewritten.
const FINGERPRINT: &str = ".fingerprint";

/// What a fleet's install files are made from.
pub struct InstallSpec<'a> {
    pub fleet: &'a str,
    pub token: &'a TokenText,
    /// The OpAMP URL collectors dial.
    pub endpoint: &'a str,
    pub collector_version: &'a str,
    pub supervisor_version: &'a str,
    /// CA certificates (PEM) collectors trust for a `wss://` or `https://` endpoint.
    pub ca: Option<&'a str>,
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

/// The text files of a fleet's install set.
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
    let mut files: Vec<TextFile> = TEMPLATES
        .iter()
        .map(|&(name, mode, template)| {
            let body = template
                .replace("@TLS@\n", &tls)
                .replace("@COPY_CA@\n", &copy_ca)
                .replace("@AGENT_SETTINGS@", &agent_settings)
                .replace("@ENDPOINT@", if name == "supervisor.yaml" { &endpoint_yaml } else { spec.endpoint })
                .replace("@DOWNLOAD_BASE@", &download_base(spec.endpoint))
                .replace("@TOKEN@", spec.token.expose())
                .replace("@FLEET@", spec.fleet)
                .replace("@COLLECTOR_VERSION@", spec.collector_version)
                .replace("@SUPERVISOR_VERSION@", spec.supervisor_version);
            TextFile { name, mode, body }
        })
        .collect();
    if let Some(ca) = ca {
        files.push(TextFile { name: "ca.pem", mode: 0o644, body: ca.to_owned() });
    }
    files
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

/// Whether the set in `dir` was written from `fingerprint`.
pub fn is_current(dir: &Path, fingerprint: &str) -> bool {
    std::fs::read_to_string(dir.join(FINGERPRINT)).is_ok_and(|written| written.trim() == fingerprint)
}

/// Writes the text files and one bundle per architecture into `dir` (created 0700; every
/// file 0600, replaced atomically), then the fingerprint. `artifacts` holds each
/// architecture's verified release files, if the server has them.
pub fn write_set(
    dir: &Path,
    spec: &InstallSpec<'_>,
    files: &[TextFile],
    artifacts: &[(&str, Vec<Artifact>)],
    fingerprint: &str,
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
            supervisor_version: "0.116.0",
            ca: None,
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
    fn only_supervisor_yaml_holds_the_token_and_tls_follows_the_scheme() {
        let (text, _) = token::issue("prod-gateway", 0, 0).expect("random");
        let files = render(&spec(&text, "wss://fleet.example.com:4320/v1/opamp"));
        for file in &files {
            assert_eq!(file.body.contains(text.expose()), file.name == "supervisor.yaml", "{}", file.name);
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
