//! `gitfleet status` and `gitfleet wait`: what a running server says of its fleets, read
//! from its read-only JSON API, as a table for people and exit codes for CD pipelines.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::duration::parse_duration;

/// The server's web address, for the commands that read its API.
#[derive(clap::Args, Clone, Debug)]
pub struct ServerArg {
    /// The gitfleet server's web address (where its status page and API are).
    #[arg(long, env = "GITFLEET_SERVER", default_value = "http://127.0.0.1:4321")]
    pub server: String,
}

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub server: ServerArg,
    /// Only this fleet.
    pub fleet: Option<String>,
    /// `table` for people, `json` for programs.
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    pub output: Output,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(clap::Args, Debug)]
pub struct WaitArgs {
    #[command(flatten)]
    pub server: ServerArg,
    /// The fleet to wait for.
    pub fleet: String,
    /// `in-sync`: every live instance runs the fleet's version. `rollout-done`: its rollout
    /// completed.
    #[arg(long = "for", value_enum)]
    pub condition: Condition,
    /// Wait first for the fleet to be on this version (e.g. `v8`): the server may not have
    /// read the commit a pipeline just merged.
    #[arg(long)]
    pub version: Option<String>,
    /// Give up after this long (exit 2).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Condition {
    InSync,
    RolloutDone,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("{url} answered {status}: {message}")]
    Refused { url: String, status: u16, message: String },
    #[error("{url} answered something that is not gitfleet's JSON: {message}")]
    NotJson { url: String, message: String },
}

/// A blocking reader of one server's API.
pub struct Api {
    base: String,
    client: reqwest::blocking::Client,
}

impl Api {
    pub fn new(server: &ServerArg) -> Result<Self, ClientError> {
        let base = server.server.trim_end_matches('/').to_owned();
        let client =
            reqwest::blocking::Client::builder().timeout(Duration::from_secs(10)).build().map_err(|error| {
                ClientError::Unreachable { url: base.clone(), message: format!("cannot start an HTTP client: {error}") }
            })?;
        Ok(Self { base, client })
    }

    /// `GET <server><path>` as JSON; an error answer carries the API's own message.
    pub fn get(&self, path: &str) -> Result<Value, ClientError> {
        let url = format!("{}{path}", self.base);
        let response = self
            .client
            .get(&url)
            .send()
            .map_err(|error| ClientError::Unreachable { url: url.clone(), message: innermost(&error) })?;
        let status = response.status().as_u16();
        let text = response
            .text()
            .map_err(|error| ClientError::Unreachable { url: url.clone(), message: innermost(&error) })?;
        let body: Result<Value, _> = serde_json::from_str(&text);
        if status != 200 {
            let message = body
                .ok()
                .and_then(|body| body["error"].as_str().map(str::to_owned))
                .unwrap_or_else(|| text.chars().filter(|c| !c.is_control()).take(200).collect());
            return Err(ClientError::Refused { url, status, message });
        }
        body.map_err(|error| ClientError::NotJson { url, message: error.to_string() })
    }
}

/// The innermost cause of `error`: reqwest's outer errors repeat the URL, which the caller
/// says once.
pub fn innermost(error: &dyn std::error::Error) -> String {
    let mut source = error;
    while let Some(inner) = source.source() {
        source = inner;
    }
    source.to_string()
}

/// The fleets the server shows (one when `fleet` is named).
pub fn fleets(api: &Api, fleet: Option<&str>) -> Result<Vec<Value>, ClientError> {
    match fleet {
        Some(name) => Ok(vec![api.get(&format!("/api/v1/fleets/{name}"))?]),
        None => Ok(api.get("/api/v1/fleets")?["fleets"].as_array().cloned().unwrap_or_default()),
    }
}

/// One fleet as `gitfleet status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FleetLine {
    pub fleet: String,
    pub version: String,
    pub rollout: String,
    pub instances: u64,
    pub in_sync: u64,
    pub failed: u64,
    pub stale: u64,
    pub last_change: String,
    /// Why a rollout halted, rolled back or is held.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl FleetLine {
    pub fn of(fleet: &Value) -> Self {
        let count = |key: &str| fleet["counts"][key].as_u64().unwrap_or(0);
        let rollout = &fleet["rollout"];
        Self {
            fleet: fleet["name"].as_str().unwrap_or("?").to_owned(),
            version: fleet["version"].as_str().map_or_else(|| "observe only".to_owned(), str::to_owned),
            rollout: rollout_text(rollout),
            instances: fleet["instances"].as_u64().unwrap_or(0),
            // During a rollout, in sync on its new version: the old one is not the goal.
            in_sync: if matches!(rollout["state"].as_str(), Some("running" | "held" | "halted")) {
                rollout["steps"].as_array().into_iter().flatten().filter_map(|step| step["in_sync"].as_u64()).sum()
            } else {
                count("in_sync")
            },
            failed: count("failed"),
            stale: count("stale"),
            last_change: rollout["changed_at"].as_str().unwrap_or("-").to_owned(),
            reason: rollout["reason"].as_str().filter(|_| rollout_is_stopped(rollout)).map(str::to_owned),
        }
    }
}

/// `step 2/4 running`, `held at 2/2`, `halted at 1/2`, `rolled back`, `complete`, `-`.
fn rollout_text(rollout: &Value) -> String {
    let state = rollout["state"].as_str().unwrap_or("");
    let steps = rollout["steps_total"].as_u64().unwrap_or(0);
    let step = rollout["step"].as_u64().unwrap_or(0);
    match state {
        "" => "-".to_owned(),
        "complete" if steps == 0 => "-".to_owned(),
        "running" => format!("step {step}/{steps}"),
        "held" | "halted" => format!("{state} at {step}/{steps}"),
        "rolled_back" => "rolled back".to_owned(),
        other => other.to_owned(),
    }
}

fn rollout_is_stopped(rollout: &Value) -> bool {
    matches!(rollout["state"].as_str(), Some("held" | "halted" | "rolled_back"))
}

/// The table: one line per fleet, columns aligned; reasons of stopped rollouts below.
pub fn render_table(lines: &[FleetLine]) -> String {
    let header = ["FLEET", "VERSION", "ROLLOUT", "IN SYNC", "FAILED", "STALE", "LAST CHANGE"];
    let rows: Vec<[String; 7]> = lines
        .iter()
        .map(|line| {
            [
                line.fleet.clone(),
                line.version.clone(),
                line.rollout.clone(),
                format!("{}/{}", line.in_sync, line.instances),
                line.failed.to_string(),
                line.stale.to_string(),
                line.last_change.clone(),
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|column| rows.iter().map(|row| row[column].len()).chain([header[column].len()]).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let text: Vec<String> = cells.iter().zip(&widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
        out.push_str(text.join("  ").trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
    for fleet in lines {
        if let Some(reason) = &fleet.reason {
            out.push_str(&format!("{}: {reason}\n", fleet.fleet));
        }
    }
    out
}

/// Where a wait stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Not yet; the text says what is missing.
    Waiting(String),
    Reached(String),
    /// It will not be reached without a new commit.
    Failed(String),
}

/// What `fleet` (the API's fleet object) says about `condition`.
pub fn progress(fleet: &Value, condition: Condition, version: Option<&str>) -> Progress {
    let name = fleet["name"].as_str().unwrap_or("?");
    let on = fleet["version"].as_str().unwrap_or("");
    if let Some(wanted) = version
        && on != wanted
    {
        return Progress::Waiting(format!("{name} is on {on}, not {wanted} yet"));
    }
    let rollout = &fleet["rollout"];
    let state = rollout["state"].as_str().unwrap_or("complete");
    let reason = rollout["reason"].as_str().unwrap_or("");
    match state {
        "halted" | "rolled_back" => return Progress::Failed(format!("{name}: {reason}")),
        "reverted" if condition == Condition::RolloutDone => {
            return Progress::Failed(format!("{name}: the rollout did not complete: {reason}"));
        }
        "running" | "held" => {
            let step = rollout["step"].as_u64().unwrap_or(0);
            let steps = rollout["steps_total"].as_u64().unwrap_or(0);
            let why = if state == "held" { format!(": {reason}") } else { String::new() };
            return Progress::Waiting(format!("{name}: rollout {state} at step {step}/{steps}{why}"));
        }
        _ => {}
    }
    // No rollout in the way: every live instance must have taken the fleet's version.
    let count = |key: &str| fleet["counts"][key].as_u64().unwrap_or(0);
    let live = fleet["instances"].as_u64().unwrap_or(0).saturating_sub(count("stale"));
    let tag = fleet["tag"].as_str().unwrap_or(on);
    let in_sync = format!("{} of {live} live instances in sync with {tag}", count("in_sync"));
    if count("pending") + count("applying") > 0 {
        return Progress::Waiting(format!("{name}: {in_sync}"));
    }
    if count("failed") > 0 {
        return Progress::Failed(format!("{name}: {} of {live} live instances failed {tag}", count("failed")));
    }
    match condition {
        Condition::InSync => Progress::Reached(format!("{name}: {in_sync}")),
        Condition::RolloutDone => Progress::Reached(format!("{name}: the rollout of {tag} is complete; {in_sync}")),
    }
}

/// Polls the server until `args` is reached (0), fails (1), or the timeout or an error (2).
pub fn wait(args: &WaitArgs, mut say: impl FnMut(&str)) -> Result<Progress, ClientError> {
    let api = Api::new(&args.server)?;
    let deadline = Instant::now() + args.timeout;
    let mut last = String::new();
    loop {
        let fleet = api.get(&format!("/api/v1/fleets/{}", args.fleet))?;
        let now = progress(&fleet, args.condition, args.version.as_deref());
        match &now {
            Progress::Waiting(text) => {
                if *text != last {
                    say(text);
                    last.clone_from(text);
                }
            }
            Progress::Reached(_) | Progress::Failed(_) => return Ok(now),
        }
        if Instant::now() >= deadline {
            return Ok(now);
        }
        std::thread::sleep(Duration::from_millis(500).min(deadline.saturating_duration_since(Instant::now())));
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn fleet(rollout: Value, counts: Value) -> Value {
        json!({
            "name": "prod-gateway", "version": "v8", "tag": "gateway/v8", "instances": 120, "drift": 0,
            "counts": counts, "rollout": rollout,
        })
    }

    fn counts(in_sync: u64, pending: u64, failed: u64, stale: u64) -> Value {
        json!({ "in_sync": in_sync, "pending": pending, "applying": 0, "failed": failed, "stale": stale, "observed": 0 })
    }

    fn rollout(state: &str, step: u64, reason: Option<&str>) -> Value {
        let steps = json!([{ "in_sync": 3 }, { "in_sync": 37 }, { "in_sync": 0 }, { "in_sync": 0 }]);
        json!({ "state": state, "step": step, "steps_total": 4, "steps": steps, "reason": reason, "changed_at": "2026-12-01T10:00:00Z" })
    }

    #[test]
    fn the_status_table() {
        let lines = vec![
            FleetLine::of(&fleet(rollout("running", 2, None), counts(40, 80, 0, 0))),
            FleetLine::of(&json!({ "name": "nodes", "instances": 3, "counts": counts(0, 0, 0, 3), "rollout": null })),
            FleetLine::of(&fleet(
                rollout("halted", 1, Some("halted at step 1/4 (canary): 1 of 3 failed")),
                counts(2, 0, 1, 0),
            )),
        ];
        expect_test::expect![[r#"
            FLEET         VERSION       ROLLOUT        IN SYNC  FAILED  STALE  LAST CHANGE
            prod-gateway  v8            step 2/4       40/120   0       0      2026-12-01T10:00:00Z
            nodes         observe only  -              0/3      0       3      -
            prod-gateway  v8            halted at 1/4  40/120   1       0      2026-12-01T10:00:00Z
            prod-gateway: halted at step 1/4 (canary): 1 of 3 failed
        "#]]
        .assert_eq(&render_table(&lines));
    }

    #[test]
    fn what_a_wait_sees() {
        let wait = |rollout: Value, counts: Value, condition| progress(&fleet(rollout, counts), condition, None);
        let done = || rollout("complete", 4, None);
        assert_eq!(
            wait(rollout("running", 2, None), counts(40, 80, 0, 0), Condition::InSync),
            Progress::Waiting("prod-gateway: rollout running at step 2/4".into())
        );
        assert!(
            matches!(wait(rollout("held", 2, Some("r")), counts(40, 0, 0, 0), Condition::RolloutDone), Progress::Waiting(text) if text.ends_with(": r"))
        );
        assert!(matches!(
            wait(rollout("rolled_back", 1, Some("r")), counts(0, 0, 0, 0), Condition::InSync),
            Progress::Failed(_)
        ));
        assert_eq!(
            wait(done(), counts(110, 0, 0, 10), Condition::InSync),
            Progress::Reached("prod-gateway: 110 of 110 live instances in sync with gateway/v8".into())
        );
        assert!(matches!(wait(done(), counts(100, 20, 0, 0), Condition::RolloutDone), Progress::Waiting(_)));
        assert_eq!(
            wait(done(), counts(119, 0, 1, 0), Condition::InSync),
            Progress::Failed("prod-gateway: 1 of 120 live instances failed gateway/v8".into())
        );
        // Going back in Git: in sync, but the rollout did not complete.
        let reverted = || rollout("reverted", 1, Some("gateway/v8 went back to gateway/v7 in Git"));
        assert!(matches!(wait(reverted(), counts(120, 0, 0, 0), Condition::InSync), Progress::Reached(_)));
        assert!(matches!(wait(reverted(), counts(120, 0, 0, 0), Condition::RolloutDone), Progress::Failed(_)));
        // A version the server has not read yet.
        let fleet = fleet(done(), counts(120, 0, 0, 0));
        assert_eq!(
            progress(&fleet, Condition::InSync, Some("v9")),
            Progress::Waiting("prod-gateway is on v8, not v9 yet".into())
        );
    }
}
