//! What each release of the OpAMP Supervisor accepts in its configuration file, so that the
//! `supervisor.yaml` gitfleet writes is one the pinned release loads.
//!
//! The Supervisor loads its configuration strictly: a key it does not know stops it at
//! start, on the host, long after the fleet file was merged. So every key written is one the
//! pinned release knows, and a pin older than any release whose keys we know (and test) is a
//! problem on the fleet file. Pure: values in, values out.
//!
//! Where a key arrived is read off the upstream sources: the `mapstructure` tags of
//! `supervisor/config/config.go` in the released modules of
//! `github.com/open-telemetry/opentelemetry-collector-contrib/cmd/opampsupervisor` (0.149.0,
//! 0.157.0 and 0.158.0; the module proxy serves no release in between).

use std::fmt;

/// A release number `major.minor.patch`, ordered as numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Release {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl Release {
    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        Self { major, minor, patch }
    }

    /// `0.158.0` (or `v0.158.0`); `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.strip_prefix('v').unwrap_or(text);
        let mut parts = text.split('.').map(|part| {
            (!part.is_empty() && part.len() <= 9 && part.bytes().all(|b| b.is_ascii_digit()))
                .then(|| part.parse::<u32>().ok())
                .flatten()
        });
        let release = Release::new(parts.next()??, parts.next()??, parts.next()??);
        parts.next().is_none().then_some(release)
    }
}

impl fmt::Display for Release {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The Supervisor release the install files pin when a fleet file names none.
pub const DEFAULT: Release = Release::new(0, 158, 0);
/// The collector release pinned with it: one release line, since the Supervisor configures
/// the collector's opamp extension for its own release.
pub const DEFAULT_COLLECTOR: Release = Release::new(0, 158, 0);
/// The oldest Supervisor release whose configuration keys gitfleet knows and tests against.
/// Every key of the base `supervisor.yaml` (remote config with status, effective config,
/// health, heartbeats, connection settings, available components, validation) is in it.
pub const OLDEST_SUPPORTED: Release = Release::new(0, 149, 0);

/// An `agent:` setting written only for releases that know it.
pub struct AgentSetting {
    pub key: &'static str,
    pub value: &'static str,
    /// The first release we know to accept it.
    pub since: Release,
    /// What it does, written above it in `supervisor.yaml`, line by line.
    pub comment: &'static [&'static str],
}

/// Both arrived after 0.149.0 and are in 0.157.0 (whose release notes announce them); the
/// releases in between could not be read, so 0.157.0 is the safe lower bound.
pub const AGENT_SETTINGS: [AgentSetting; 2] = [
    AgentSetting {
        key: "collector_crash_log_snippet_kib",
        value: "4",
        since: Release::new(0, 157, 0),
        comment: &[
            "When the collector exits while applying a configuration, the last 4 KiB of its log",
            "go with the failure to gitfleet (its API, page and status branch).",
        ],
    },
    AgentSetting {
        key: "automatic_config_rollback",
        value: "true",
        since: Release::new(0, 157, 0),
        comment: &[
            "A configuration that makes the collector exit is replaced by the last one that",
            "worked; gitfleet keeps the new one failed and records the rollback.",
        ],
    },
];

/// The version-dependent lines of the `agent:` section for `release`, indented for it.
pub fn agent_settings(release: Release) -> String {
    let mut lines = String::new();
    for setting in AGENT_SETTINGS.iter().filter(|setting| release >= setting.since) {
        for comment in setting.comment {
            lines.push_str(&format!("  # {comment}\n"));
        }
        lines.push_str(&format!("  {}: {}\n", setting.key, setting.value));
    }
    lines
}

/// Why a fleet cannot pin `release`, if it cannot.
pub fn check_pin(release: Release) -> Result<(), String> {
    if release < OLDEST_SUPPORTED {
        return Err(format!(
            "OpAMP Supervisor {release} is older than {OLDEST_SUPPORTED}, the oldest release gitfleet writes a \
             configuration for (it loads its configuration strictly, and older releases lack keys the install \
             files need); pin {OLDEST_SUPPORTED} or newer, or leave it out for {DEFAULT}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_parse_and_order_as_numbers() {
        assert_eq!(Release::parse("0.158.0"), Some(Release::new(0, 158, 0)));
        assert_eq!(Release::parse("v1.2.3"), Some(Release::new(1, 2, 3)));
        for bad in ["", "0.158", "0.158.0.1", "0.x.0", "latest", "0..1", "-1.0.0", "0.158.0-rc.1", "9999999999.0.0"] {
            assert_eq!(Release::parse(bad), None, "{bad}");
        }
        assert!(Release::new(0, 99, 0) < Release::new(0, 100, 0), "not compared as text");
        assert_eq!(Release::new(0, 149, 0).to_string(), "0.149.0");
    }

    #[test]
    fn settings_are_written_only_for_releases_that_know_them() {
        assert_eq!(agent_settings(Release::new(0, 149, 0)), "");
        assert_eq!(agent_settings(Release::new(0, 156, 9)), "");
        let current = agent_settings(Release::new(0, 157, 0));
        assert!(current.contains("\n  collector_crash_log_snippet_kib: 4\n"), "{current}");
        assert!(current.contains("\n  automatic_config_rollback: true\n"), "{current}");
        assert!(current.lines().all(|line| line.starts_with("  ")), "indented under agent:\n{current}");
        assert_eq!(agent_settings(DEFAULT), current);
    }

    #[test]
    fn pins_older_than_the_oldest_supported_are_refused() {
        assert_eq!(check_pin(OLDEST_SUPPORTED), Ok(()));
        assert_eq!(check_pin(DEFAULT), Ok(()));
        let refused = check_pin(Release::new(0, 115, 0)).expect_err("too old");
        assert!(refused.starts_with("OpAMP Supervisor 0.115.0 is older than 0.149.0"), "{refused}");
        assert!(DEFAULT >= OLDEST_SUPPORTED);
    }
}
