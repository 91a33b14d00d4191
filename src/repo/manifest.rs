//! Fleet files (`fleets/<fleet>.toml`): raw TOML → a validated `FleetSpec`, with every
//! problem found (unknown keys, wrong types, bad durations) reported with its line.
//!
//! The file is walked by hand over `toml`'s spanned table instead of through serde so that
//! all problems of a file are reported at once, not only the first.

use std::time::Duration;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::duration::parse_duration;
use crate::install::supervisor::{self, Release};
use crate::problem::{Problem, line_of_offset};
use crate::repo::names;
use crate::rollout::{self, Amount, OnFailure, RolloutSpec, Selector, StepSpec, Strategy};

pub const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(120);

/// A fleet as its file declares it, before its version is resolved against the tags.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FleetSpec {
    pub name: String,
    pub file: String,
    pub description: String,
    /// The configuration the fleet runs; `None` only for observe-only fleets.
    pub config: Option<String>,
    pub version: Option<VersionSelector>,
    /// Line of `version` (or of `config`), where problems with the assignment point.
    pub version_line: Option<u32>,
    pub token: TokenPolicy,
    pub install: InstallSettings,
    pub health: HealthSettings,
    pub rollout: RolloutSpec,
}

impl FleetSpec {
    pub fn observe_only(&self) -> bool {
        self.version.is_none()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum VersionSelector {
    /// A published version such as `v7`.
    Exact(String),
    /// The highest published version.
    Latest,
}

impl std::fmt::Display for VersionSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VersionSelector::Exact(version) => f.write_str(version),
            VersionSelector::Latest => f.write_str("latest"),
        }
    }
}

/// The `[token]` table.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenPolicy {
    /// `None` means the token never expires.
    pub expires: Option<Duration>,
    pub rotate: u32,
    pub grace: Duration,
    pub revoked: Vec<String>,
}

impl Default for TokenPolicy {
    fn default() -> Self {
        Self { expires: None, rotate: 0, grace: DEFAULT_GRACE, revoked: Vec::new() }
    }
}

/// The `[install]` table.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InstallSettings {
    pub endpoint: Option<String>,
    pub collector_version: Option<String>,
    pub supervisor_version: Option<String>,
    /// What the collector may read beyond its own files (the systemd unit grants it).
    pub access: Access,
}

/// What a collector must read on its host, for the hardened systemd unit to allow. The
/// unit runs it as an unprivileged user that sees only its own processes; receivers that
/// read logs or other processes need one of these.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Access {
    /// Supplementary groups: `systemd-journal` for the journal, `adm` for most of /var/log.
    pub groups: Vec<String>,
    /// Read any file, whatever its permissions (CAP_DAC_READ_SEARCH): logs only root may
    /// read, like /var/log/pods. Read-only: the file system stays read-only but for the
    /// collector's own state.
    pub read_all_files: bool,
    /// See and read every process (ProtectProc=default, CAP_SYS_PTRACE): hostmetrics'
    /// process scrapers.
    pub see_processes: bool,
}

/// The `[health]` table.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HealthSettings {
    pub stale_after: Duration,
}

impl Default for HealthSettings {
    fn default() -> Self {
        Self { stale_after: DEFAULT_STALE_AFTER }
    }
}

/// Parses one fleet file. Returns the spec when the file is usable (it may still carry
/// warnings) and every problem found.
pub fn parse_fleet(name: &str, file: &str, text: &str) -> (Option<FleetSpec>, Vec<Problem>) {
    let mut walker = Walker { file, text, problems: Vec::new() };
    let table = match DeTable::parse(text) {
        Ok(table) => table,
        Err(error) => {
            let line = error.span().map(|span| line_of_offset(text, span.start));
            let message = error.message().trim().to_owned();
            return (None, vec![Problem::error(file, line, format!("invalid TOML: {message}"))]);
        }
    };
    let table = table.get_ref();
    walker.known_keys(table, "", &["description", "config", "version", "token", "install", "health", "rollout"]);

    let description = walker.string(table, "description").map(|(s, _)| s).unwrap_or_default();
    let config = walker.string(table, "config");
    let version = walker.string(table, "version");
    let config_line = config.as_ref().map(|(_, line)| *line);
    let config = config.and_then(|(config, line)| match names::check_name(&config) {
        Ok(()) => Some(config),
        Err(message) => {
            walker.error(line, format!("`config`: {message}"));
            None
        }
    });
    let version_line = version.as_ref().map(|(_, line)| *line).or(config_line);
    let version = version.and_then(|(version, line)| {
        if version == "latest" {
            return Some(VersionSelector::Latest);
        }
        match names::check_version(&version) {
            Ok(()) => Some(VersionSelector::Exact(version)),
            Err(message) => {
                walker.error(line, format!("`version`: {message}"));
                None
            }
        }
    });
    if version.is_some() && config.is_none() && config_line.is_none() {
        walker.error(
            version_line.unwrap_or(1),
            "`version` is set but `config` is missing: which configuration should the fleet run?".to_owned(),
        );
    }

    let token = walker.token(table);
    let install = walker.install(table);
    let health = walker.health(table);
    let rollout = walker.rollout(table);

    walker.problems.sort_by_key(|problem| problem.line);
    let usable = !walker.problems.iter().any(Problem::is_error);
    let spec = usable.then(|| FleetSpec {
        name: name.to_owned(),
        file: file.to_owned(),
        description,
        config,
        version,
        version_line,
        token,
        install,
        health,
        rollout,
    });
    (spec, walker.problems)
}

struct Walker<'a> {
    file: &'a str,
    text: &'a str,
    problems: Vec<Problem>,
}

type Entry<'i> = Spanned<DeValue<'i>>;

impl<'a> Walker<'a> {
    fn line(&self, offset: usize) -> u32 {
        line_of_offset(self.text, offset)
    }

    fn error(&mut self, line: u32, message: String) {
        self.problems.push(Problem::error(self.file, Some(line), message));
    }

    fn known_keys(&mut self, table: &DeTable<'_>, prefix: &str, allowed: &[&str]) {
        for key in table.keys() {
            if !allowed.contains(&key.get_ref().as_ref()) {
                let line = self.line(key.span().start);
                self.error(line, format!("unknown key `{prefix}{}` (allowed: {})", key.get_ref(), allowed.join(", ")));
            }
        }
    }

    fn get<'t, 'i>(&self, table: &'t DeTable<'i>, key: &str) -> Option<&'t Entry<'i>> {
        table.iter().find(|(k, _)| k.get_ref().as_ref() == key).map(|(_, v)| v)
    }

    fn string(&mut self, table: &DeTable<'_>, key: &str) -> Option<(String, u32)> {
        let value = self.get(table, key)?;
        let line = self.line(value.span().start);
        match value.get_ref().as_str() {
            Some(text) => Some((text.to_owned(), line)),
            None => {
                self.error(line, format!("`{key}` must be a string, found {}", value.get_ref().type_str()));
                None
            }
        }
    }

    /// A list of strings: a problem on its line when it is not a list, and on each item's
    /// line for the items `check` refuses (it gets `None` for an item that is not a string).
    fn string_list(
        &mut self,
        table: &DeTable<'_>,
        key: &str,
        not_a_list: &str,
        check: impl Fn(Option<&str>) -> Result<(), String>,
    ) -> Vec<String> {
        let mut list = Vec::new();
        let Some(value) = self.get(table, key) else { return list };
        let Some(items) = value.get_ref().as_array() else {
            let line = self.line(value.span().start);
            self.error(line, not_a_list.to_owned());
            return list;
        };
        for item in items {
            let text = item.get_ref().as_str();
            match check(text) {
                Ok(()) => list.extend(text.map(str::to_owned)),
                Err(message) => {
                    let line = self.line(item.span().start);
                    self.error(line, message);
                }
            }
        }
        list
    }

    /// A `true`/`false` key; false when absent or wrong (with a problem).
    fn boolean(&mut self, table: &DeTable<'_>, key: &str, qualified: &str) -> bool {
        let Some(value) = self.get(table, key) else { return false };
        match value.get_ref().as_bool() {
            Some(flag) => flag,
            None => {
                let line = self.line(value.span().start);
                self.error(line, format!("`{qualified}` must be true or false, found {}", value.get_ref().type_str()));
                false
            }
        }
    }

    /// A whole number from 0; `None` (with a problem saying `what`) otherwise.
    fn whole(&mut self, value: &Entry<'_>, qualified: &str, what: &str) -> Option<u32> {
        let parsed = value
            .get_ref()
            .as_integer()
            .and_then(|integer| u32::from_str_radix(integer.as_str(), integer.radix()).ok());
        if parsed.is_none() {
            let line = self.line(value.span().start);
            self.error(line, format!("`{qualified}` must be a whole number from 0 ({what})"));
        }
        parsed
    }

    /// A count (`3`) or a percentage of the fleet (`"10%"`); `least` is the smallest count.
    fn amount(&mut self, table: &DeTable<'_>, key: &str, qualified: &str, least: u32) -> Option<Amount> {
        let value = self.get(table, key)?;
        let line = self.line(value.span().start);
        let amount = match (value.get_ref().as_integer(), value.get_ref().as_str()) {
            (Some(integer), _) => u32::from_str_radix(integer.as_str(), integer.radix()).ok().map(Amount::Count),
            (None, Some(text)) => text
                .strip_suffix('%')
                .and_then(|number| number.trim().parse::<u32>().ok())
                .filter(|percent| (1..=100).contains(percent))
                .map(Amount::Percent),
            (None, None) => None,
        };
        match amount {
            Some(Amount::Count(count)) if count < least => {
                self.error(line, format!("`{qualified}` must be at least {least}"));
                None
            }
            Some(amount) => Some(amount),
            None => {
                self.error(
                    line,
                    format!("`{qualified}` must be a count like 3 or a share of the fleet like \"10%\" (1% to 100%)"),
                );
                None
            }
        }
    }

    fn subtable<'t, 'i>(&mut self, table: &'t DeTable<'i>, key: &str) -> Option<&'t DeTable<'i>> {
        let value = self.get(table, key)?;
        match value.get_ref().as_table() {
            Some(sub) => Some(sub),
            None => {
                let line = self.line(value.span().start);
                self.error(line, format!("`{key}` must be a table ([{key}]), found {}", value.get_ref().type_str()));
                None
            }
        }
    }

    fn duration(&mut self, table: &DeTable<'_>, key: &str, qualified: &str) -> Option<Duration> {
        let (text, line) = self.string(table, key)?;
        match parse_duration(&text) {
            Ok(duration) => Some(duration),
            Err(message) => {
                self.error(line, format!("`{qualified}`: {message}"));
                None
            }
        }
    }

    fn token(&mut self, table: &DeTable<'_>) -> TokenPolicy {
        let mut policy = TokenPolicy::default();
        let Some(token) = self.subtable(table, "token") else {
            return policy;
        };
        self.known_keys(token, "token.", &["expires", "rotate", "grace", "revoked"]);
        if let Some((text, line)) = self.string(token, "expires") {
            if text != "never" {
                match parse_duration(&text) {
                    Ok(duration) if duration.is_zero() => {
                        self.error(line, "`token.expires` must be longer than zero (or \"never\")".to_owned())
                    }
                    Ok(duration) => policy.expires = Some(duration),
                    Err(message) => self.error(line, format!("`token.expires`: {message} (or \"never\")")),
                }
            }
        }
        if let Some(value) = self.get(token, "rotate")
            && let Some(rotate) = self.whole(value, "token.rotate", "bump it to issue a new token")
        {
            policy.rotate = rotate;
        }
        if let Some(grace) = self.duration(token, "grace", "token.grace") {
            policy.grace = grace;
        }
        policy.revoked =
            self.string_list(token, "revoked", "`token.revoked` must be a list of token ids", |item| match item {
                Some(id) if is_token_id(id) => Ok(()),
                Some(id) => {
                    Err(format!("`{}` in `token.revoked` is not a token id (like tk_4f9c2a1b)", id.escape_default()))
                }
                None => Err("`token.revoked` must list token ids as strings".to_owned()),
            });
        policy
    }

    fn install(&mut self, table: &DeTable<'_>) -> InstallSettings {
        let mut install = InstallSettings::default();
        let Some(section) = self.subtable(table, "install") else {
            return install;
        };
        self.known_keys(
            section,
            "install.",
            &["endpoint", "collector_version", "supervisor_version", "groups", "read_all_files", "see_processes"],
        );
        install.access.read_all_files = self.boolean(section, "read_all_files", "install.read_all_files");
        install.access.see_processes = self.boolean(section, "see_processes", "install.see_processes");
        install.access.groups =
            self.string_list(section, "groups", "`install.groups` must be a list of group names", |item| match item {
                Some(group) if is_group_name(group) => Ok(()),
                _ => Err("`install.groups` lists Unix group names, like \"systemd-journal\" or \"adm\"".to_owned()),
            });
        if let Some((endpoint, line)) = self.string(section, "endpoint") {
            match check_endpoint(&endpoint) {
                Ok(()) => install.endpoint = Some(endpoint),
                Err(message) => self.error(line, format!("`install.endpoint`: {message}")),
            }
        }
        for key in ["collector_version", "supervisor_version"] {
            let Some((version, line)) = self.string(section, key) else { continue };
            let Some(release) = Release::parse(&version) else {
                self.error(
                    line,
                    format!(
                        "`install.{key}` must be a release number like {}, found `{}`",
                        supervisor::DEFAULT,
                        version.escape_default()
                    ),
                );
                continue;
            };
            if key == "collector_version" {
                install.collector_version = Some(release.to_string());
            } else {
                match supervisor::check_pin(release) {
                    Ok(()) => install.supervisor_version = Some(release.to_string()),
                    Err(message) => self.error(line, format!("`install.supervisor_version`: {message}")),
                }
            }
        }
        install
    }

    fn health(&mut self, table: &DeTable<'_>) -> HealthSettings {
        let mut health = HealthSettings::default();
        let Some(section) = self.subtable(table, "health") else {
            return health;
        };
        self.known_keys(section, "health.", &["stale_after"]);
        if let Some(stale_after) = self.duration(section, "stale_after", "health.stale_after") {
            health.stale_after = stale_after;
        }
        health
    }

    fn rollout(&mut self, table: &DeTable<'_>) -> RolloutSpec {
        let mut spec = RolloutSpec::default();
        let Some(section) = self.subtable(table, "rollout") else {
            return spec;
        };
        self.known_keys(
            section,
            "rollout.",
            &["strategy", "bake", "max_failures", "on_failure", "release", "batches", "steps"],
        );
        if let Some(bake) = self.duration(section, "bake", "rollout.bake") {
            spec.bake = bake;
        }
        if let Some(max_failures) = self.amount(section, "max_failures", "rollout.max_failures", 0) {
            spec.max_failures = max_failures;
        }
        if let Some((on_failure, line)) = self.string(section, "on_failure") {
            match on_failure.as_str() {
                "halt" => spec.on_failure = OnFailure::Halt,
                "rollback" => spec.on_failure = OnFailure::Rollback,
                other => self.error(
                    line,
                    format!("`rollout.on_failure` is \"halt\" or \"rollback\", found `{}`", other.escape_default()),
                ),
            }
        }
        if let Some(value) = self.get(section, "release")
            && let Some(release) = self.whole(value, "rollout.release", "raise it to release a held step")
        {
            spec.release = release;
        }
        let batches = self.subtable(section, "batches").map(|batches| self.batches(batches));
        let steps = self.steps(section);
        let strategy = self.string(section, "strategy");
        let present = match (&batches, &steps) {
            (Some(_), Some(_)) => {
                let line = self.get(section, "steps").map_or(1, |value| self.line(value.span().start));
                self.error(line, "`[rollout]` has both `batches` and `steps`: choose one".to_owned());
                return spec;
            }
            (Some(_), None) => "batches",
            (None, Some(_)) => "steps",
            (None, None) => "all",
        };
        if let Some((strategy, line)) = strategy
            && strategy != present
        {
            let message = match strategy.as_str() {
                "all" | "batches" | "steps" if present == "all" => {
                    format!("`rollout.strategy = \"{strategy}\"` needs a `[rollout.{strategy}]` table")
                }
                "all" | "batches" | "steps" => {
                    format!("`rollout.strategy` is \"{strategy}\" but the table has `{present}`")
                }
                other => format!(
                    "`rollout.strategy` is \"all\", \"batches\" or \"steps\", found `{}`",
                    other.escape_default()
                ),
            };
            self.error(line, message);
        }
        spec.strategy = match (batches, steps) {
            (Some(batches), _) => batches,
            (_, Some(steps)) => Strategy::Steps(steps),
            _ => Strategy::All,
        };
        spec
    }

    fn batches(&mut self, section: &DeTable<'_>) -> Strategy {
        self.known_keys(section, "rollout.batches.", &["initial", "factor", "cap"]);
        let initial = self.amount(section, "initial", "rollout.batches.initial", 1).unwrap_or(Amount::Count(1));
        let cap = self.amount(section, "cap", "rollout.batches.cap", 1);
        let factor = match self.get(section, "factor") {
            Some(value) => {
                match self.whole(value, "rollout.batches.factor", "each batch is this many times the one before") {
                    Some(0) => {
                        let line = self.line(value.span().start);
                        self.error(line, "`rollout.batches.factor` must be at least 1".to_owned());
                        1
                    }
                    Some(factor) => factor,
                    None => 1,
                }
            }
            None => 2,
        };
        Strategy::Batches { initial, factor, cap }
    }

    /// `[[rollout.steps]]`, or `None` when there are none.
    fn steps(&mut self, section: &DeTable<'_>) -> Option<Vec<StepSpec>> {
        let value = self.get(section, "steps")?;
        let line = self.line(value.span().start);
        let Some(items) = value.get_ref().as_array() else {
            self.error(line, "`rollout.steps` must be a list of tables ([[rollout.steps]])".to_owned());
            return Some(Vec::new());
        };
        if items.is_empty() || items.len() > rollout::MAX_STEPS {
            self.error(line, format!("`rollout.steps` must have 1 to {} steps", rollout::MAX_STEPS));
        }
        let mut steps = Vec::new();
        for (index, item) in items.iter().enumerate() {
            let item_line = self.line(item.span().start);
            let Some(table) = item.get_ref().as_table() else {
                self.error(item_line, "each of `rollout.steps` must be a table ([[rollout.steps]])".to_owned());
                continue;
            };
            self.known_keys(table, "rollout.steps.", &["name", "host", "attributes", "max", "hold"]);
            let name = match self.string(table, "name") {
                Some((name, line)) if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) => {
                    self.error(line, "`rollout.steps.name` must be 1 to 64 printable characters".to_owned());
                    format!("step {}", index + 1)
                }
                Some((name, _)) => name,
                None => format!("step {}", index + 1),
            };
            let mut selector =
                Selector { host: self.string(table, "host").map(|(host, _)| host), ..Selector::default() };
            if let Some(attributes) = self.subtable(table, "attributes") {
                for (key, value) in attributes.iter() {
                    match value.get_ref().as_str() {
                        Some(pattern) => {
                            selector.attributes.insert(key.get_ref().to_string(), pattern.to_owned());
                        }
                        None => {
                            let line = self.line(value.span().start);
                            self.error(
                                line,
                                format!("`rollout.steps.attributes.{}` must be a string (a glob)", key.get_ref()),
                            );
                        }
                    }
                }
            }
            let max = self.amount(table, "max", "rollout.steps.max", 1);
            let hold = self.boolean(table, "hold", "rollout.steps.hold");
            steps.push(StepSpec { name, selector, max, hold });
        }
        Some(steps)
    }
}

/// Token ids are public: `tk_` followed by lowercase hex.
pub fn is_token_id(id: &str) -> bool {
    id.strip_prefix("tk_").is_some_and(|rest| {
        (8..=32).contains(&rest.len()) && rest.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// What collectors dial: a ws(s) or http(s) URL with a host.
fn check_endpoint(endpoint: &str) -> Result<(), String> {
    let Some((scheme, rest)) = endpoint.split_once("://") else {
        return Err(format!(
            "`{}` is not a URL (expected e.g. wss://fleet.example.com:4320/v1/opamp)",
            endpoint.escape_default()
        ));
    };
    if !matches!(scheme, "ws" | "wss" | "http" | "https") {
        return Err(format!("scheme `{scheme}` is not one collectors dial (ws, wss, http or https)"));
    }
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("`{}` has no valid host", endpoint.escape_default()));
    }
    Ok(())
}

/// A group name as `useradd` accepts it; nothing a unit file could misread.
fn is_group_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        && name.len() <= 32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        parse_fleet("prod", "fleets/prod.toml", text).1.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn a_full_fleet_file() {
        let text = r#"
description = "Gateway collectors, prod"
config  = "gateway"
version = "v7"
[token]
expires = "180d"
rotate  = 1
grace   = "24h"
revoked = ["tk_4f9c2a1b"]
[install]
endpoint = "wss://fleet.example.com:4320/v1/opamp"
collector_version  = "0.158.0"
supervisor_version = "0.158.0"
[health]
stale_after = "2m"
"#;
        let (spec, problems) = parse_fleet("prod", "fleets/prod.toml", text);
        assert_eq!(problems, vec![]);
        let spec = spec.expect("valid fleet");
        assert_eq!(spec.config.as_deref(), Some("gateway"));
        assert_eq!(spec.version, Some(VersionSelector::Exact("v7".to_owned())));
        assert_eq!(spec.version_line, Some(4));
        assert_eq!(
            spec.token,
            TokenPolicy {
                expires: Some(Duration::from_secs(180 * 86_400)),
                rotate: 1,
                grace: Duration::from_secs(86_400),
                revoked: vec!["tk_4f9c2a1b".to_owned()],
            }
        );
        assert_eq!(spec.install.endpoint.as_deref(), Some("wss://fleet.example.com:4320/v1/opamp"));
        assert_eq!(spec.install.supervisor_version.as_deref(), Some("0.158.0"));
        assert_eq!(spec.health.stale_after, Duration::from_secs(120));
    }

    #[test]
    fn a_supervisor_older_than_the_oldest_supported_is_an_error_on_its_line() {
        let text = "config = \"gateway\"\nversion = \"v1\"\n[install]\ncollector_version = \"0.115.0\"\nsupervisor_version = \"v0.115.0\"\n";
        let (spec, problems) = parse_fleet("prod", "fleets/prod.toml", text);
        assert!(spec.is_none(), "the fleet keeps its last good state");
        let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with(
                "fleets/prod.toml:5: error: `install.supervisor_version`: OpAMP Supervisor 0.115.0 is older than 0.149.0"
            ),
            "{problems:?}"
        );
        let newer = text.replace("v0.115.0", "v0.149.0");
        let (spec, problems) = parse_fleet("prod", "fleets/prod.toml", &newer);
        assert_eq!(problems, vec![]);
        assert_eq!(spec.expect("valid").install.supervisor_version.as_deref(), Some("0.149.0"), "the v is dropped");
    }

    #[test]
    fn observe_only_and_latest() {
        let (spec, problems) = parse_fleet("edge", "fleets/edge.toml", "description = \"watch only\"\n");
        assert_eq!(problems, vec![]);
        assert!(spec.expect("valid").observe_only());
        let (spec, _) = parse_fleet("staging", "fleets/staging.toml", "config = \"gateway\"\nversion = \"latest\"\n");
        assert_eq!(spec.expect("valid").version, Some(VersionSelector::Latest));
    }

    #[test]
    fn every_unknown_key_is_reported_with_its_line() {
        assert_eq!(
            problems("config = \"gateway\"\nverison = \"v7\"\n[token]\nexpire = \"1y\"\n[instal]\n"),
            vec![
                "fleets/prod.toml:2: error: unknown key `verison` (allowed: description, config, version, token, install, health, rollout)",
                "fleets/prod.toml:4: error: unknown key `token.expire` (allowed: expires, rotate, grace, revoked)",
                "fleets/prod.toml:5: error: unknown key `instal` (allowed: description, config, version, token, install, health, rollout)",
            ]
        );
    }

    #[test]
    fn bad_values() {
        assert_eq!(
            problems(
                "config = \"../etc\"\nversion = 7\n[token]\nexpires = \"soon\"\nrotate = -1\nrevoked = [\"abc\"]\n[install]\nendpoint = \"ftp://x\"\ncollector_version = \"latest\"\n[health]\nstale_after = \"2\"\n"
            ),
            vec![
                "fleets/prod.toml:1: error: `config`: name `../etc` must start with a lowercase letter or a digit",
                "fleets/prod.toml:2: error: `version` must be a string, found integer",
                "fleets/prod.toml:4: error: `token.expires`: `soon` is not a duration (expected e.g. 30s, 2m, 36h, 180d, 1y) (or \"never\")",
                "fleets/prod.toml:5: error: `token.rotate` must be a whole number from 0 (bump it to issue a new token)",
                "fleets/prod.toml:6: error: `abc` in `token.revoked` is not a token id (like tk_4f9c2a1b)",
                "fleets/prod.toml:8: error: `install.endpoint`: scheme `ftp` is not one collectors dial (ws, wss, http or https)",
                "fleets/prod.toml:9: error: `install.collector_version` must be a release number like 0.158.0, found `latest`",
                "fleets/prod.toml:11: error: `health.stale_after`: `2` needs a unit (s, m, h, d, w or y)",
            ]
        );
    }

    #[test]
    fn broken_toml_and_version_without_config() {
        assert_eq!(
            problems("config = \"gateway\nversion = \"v1\"\n"),
            vec!["fleets/prod.toml:1: error: invalid TOML: invalid basic string, expected `\"`"]
        );
        assert_eq!(
            problems("version = \"v1\"\n"),
            vec![
                "fleets/prod.toml:1: error: `version` is set but `config` is missing: which configuration should the fleet run?"
            ]
        );
    }

    #[test]
    fn install_access_says_what_the_collector_may_read() {
        let text = "config = \"node-agent\"\nversion = \"v1\"\n[install]\ngroups = [\"systemd-journal\", \"adm\"]\nread_all_files = true\nsee_processes = true\n";
        let (spec, problems) = parse_fleet("nodes", "fleets/nodes.toml", text);
        assert_eq!(problems, Vec::new());
        let access = spec.expect("valid").install.access;
        assert_eq!(access.groups, vec!["systemd-journal", "adm"]);
        assert!(access.read_all_files && access.see_processes);

        let bad = "[install]\ngroups = [\"Admins\", \"x y\", 3]\nread_all_files = \"yes\"\nsee_processes = 1\n";
        let (_, problems) = parse_fleet("nodes", "fleets/nodes.toml", bad);
        let messages: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            messages,
            vec![
                "fleets/nodes.toml:2: error: `install.groups` lists Unix group names, like \"systemd-journal\" or \"adm\"",
                "fleets/nodes.toml:2: error: `install.groups` lists Unix group names, like \"systemd-journal\" or \"adm\"",
                "fleets/nodes.toml:2: error: `install.groups` lists Unix group names, like \"systemd-journal\" or \"adm\"",
                "fleets/nodes.toml:3: error: `install.read_all_files` must be true or false, found string",
                "fleets/nodes.toml:4: error: `install.see_processes` must be true or false, found integer",
            ]
        );
    }
    #[test]
    fn a_rollout_with_steps() {
        let text = r#"
config = "gateway"
version = "v8"
[rollout]
strategy = "steps"
bake = "10m"
max_failures = "5%"
on_failure = "rollback"
release = 2
[[rollout.steps]]
name = "canary"
host = "gw-canary-*"
attributes = { "os.type" = "linux" }
max = 3
[[rollout.steps]]
name = "everyone"
hold = true
"#;
        let (spec, problems) = parse_fleet("prod", "fleets/prod.toml", text);
        assert_eq!(problems, vec![]);
        let rollout = spec.expect("valid fleet").rollout;
        assert_eq!(rollout.bake, Duration::from_secs(600));
        assert_eq!(rollout.max_failures, Amount::Percent(5));
        assert_eq!(rollout.on_failure, OnFailure::Rollback);
        assert_eq!(rollout.release, 2);
        let Strategy::Steps(steps) = rollout.strategy else { panic!("steps") };
        assert_eq!(steps[0].name, "canary");
        assert_eq!(steps[0].selector.to_string(), "host=gw-canary-*, os.type=linux");
        assert_eq!((steps[0].max, steps[0].hold), (Some(Amount::Count(3)), false));
        assert_eq!((steps[1].max, steps[1].hold), (None, true));
        assert!(steps[1].selector.is_everything());
    }

    #[test]
    fn rollout_batches_and_the_default() {
        let (spec, _) = parse_fleet("prod", "f.toml", "config = \"gateway\"\nversion = \"v1\"\n");
        assert_eq!(spec.unwrap().rollout.strategy, Strategy::All);
        let text = "config = \"g\"\nversion = \"v1\"\n[rollout.batches]\ninitial = \"1%\"\nfactor = 3\ncap = 500\n";
        let (spec, problems) = parse_fleet("prod", "f.toml", text);
        assert_eq!(problems, vec![]);
        assert_eq!(
            spec.unwrap().rollout.strategy,
            Strategy::Batches { initial: Amount::Percent(1), factor: 3, cap: Some(Amount::Count(500)) }
        );
    }

    #[test]
    fn bad_rollouts_say_what_is_wrong_on_their_line() {
        let text = r#"config = "g"
version = "v1"
[rollout]
strategy = "canary"
bake = "soon"
max_failures = "150%"
on_failure = "panic"
release = -1
[[rollout.steps]]
max = 0
colour = "red"
[[rollout.steps]]
attributes = { "os.type" = 3 }
"#;
        expect_test::expect![[r#"
            [
                "f.toml:4: error: `rollout.strategy` is \"all\", \"batches\" or \"steps\", found `canary`",
                "f.toml:5: error: `rollout.bake`: `soon` is not a duration (expected e.g. 30s, 2m, 36h, 180d, 1y)",
                "f.toml:6: error: `rollout.max_failures` must be a count like 3 or a share of the fleet like \"10%\" (1% to 100%)",
                "f.toml:7: error: `rollout.on_failure` is \"halt\" or \"rollback\", found `panic`",
                "f.toml:8: error: `rollout.release` must be a whole number from 0 (raise it to release a held step)",
                "f.toml:10: error: `rollout.steps.max` must be at least 1",
                "f.toml:11: error: unknown key `rollout.steps.colour` (allowed: name, host, attributes, max, hold)",
                "f.toml:13: error: `rollout.steps.attributes.os.type` must be a string (a glob)",
            ]
        "#]]
        .assert_debug_eq(&parse_fleet("prod", "f.toml", text).1.iter().map(ToString::to_string).collect::<Vec<_>>());
        let both =
            "config = \"g\"\nversion = \"v1\"\n[rollout]\nbatches = { initial = 1 }\nsteps = [{ name = \"a\" }]\n";
        assert_eq!(
            problems(both),
            vec!["fleets/prod.toml:5: error: `[rollout]` has both `batches` and `steps`: choose one"]
        );
        let missing = "config = \"g\"\nversion = \"v1\"\n[rollout]\nstrategy = \"batches\"\n";
        assert_eq!(
            problems(missing),
            vec!["fleets/prod.toml:4: error: `rollout.strategy = \"batches\"` needs a `[rollout.batches]` table"]
        );
    }
}
