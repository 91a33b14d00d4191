//! The status page (PRODUCT.md §8): overview, fleet, instance and configuration pages,
//! rendered on the server from the same state as the JSON API, with `/events` telling open
//! pages when to refresh. Read-only: only `GET` routes, no forms.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;

use crate::instance::Status;
use crate::opamp::codec::InstanceUid;
use crate::problem::{Problem, Severity};
use crate::reconciler::View;
use crate::repo::desired::{Configuration, Version};
use crate::repo::lint;
use crate::repo::version::compare_versions;
use crate::rollout::{Rollout, State as RolloutState, StepCounts};
use crate::status::{FleetStatus, InstanceRow};
use crate::web::WebState;
use crate::web::html::{
    self, Badge, Bar, Message, Nav, OrDash, RolloutBar, Short, Text, Time, Url, count, status_label,
};

/// Instance table rows per page: enough to scan, small enough to render fast at 20,000.
const ROWS_PER_PAGE: usize = 500;

pub fn routes() -> Router<WebState> {
    Router::new()
        .route("/", get(overview))
        .route("/fleets/{name}", get(fleet))
        .route("/instances/{uid}", get(instance))
        .route("/configs", get(configs))
        .route("/configs/{name}", get(config))
        .route("/configs/{name}/{version}", get(config_version))
        .route("/events", get(events))
        .route("/assets/gitfleet.css", get(|| async { asset("text/css; charset=utf-8", html::STYLESHEET) }))
        .route("/assets/gitfleet.js", get(|| async { asset("text/javascript; charset=utf-8", html::SCRIPT) }))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "max-age=300")], body).into_response()
}

fn not_found(what: &str) -> Response {
    let body = format!("<h1>Not found</h1><p class=\"sub\">{}</p><p><a href=\"/\">All fleets</a></p>", Text(what));
    (StatusCode::NOT_FOUND, html::page("Not found", Nav::Fleets, &body)).into_response()
}

fn not_ready() -> Response {
    let body =
        "<h1>Starting</h1><p class=\"sub\">The repository has not been read yet; this page refreshes by itself.</p>";
    (StatusCode::SERVICE_UNAVAILABLE, html::page("Starting", Nav::Fleets, body)).into_response()
}

/// The state database could not be read: the page says why, and can be loaded again.
fn unavailable(why: &str) -> Response {
    let body = format!(
        "<h1>Cannot show this now</h1><p class=\"sub\">The other replicas' instances are in the state database, which cannot be read now: {}</p>",
        Text(why)
    );
    (StatusCode::SERVICE_UNAVAILABLE, html::page("Unavailable", Nav::Fleets, &body)).into_response()
}

/// Server-sent events: `change` whenever a fleet's status or the desired state changes.
async fn events(State(state): State<WebState>) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    let mut statuses = state.statuses.clone();
    let mut view = state.view.clone();
    statuses.mark_unchanged();
    view.mark_unchanged();
    let cancel = state.cancel.clone();
    let stream =
        futures_util::stream::unfold((statuses, view, cancel), |(mut statuses, mut view, cancel)| async move {
            tokio::select! {
                () = cancel.cancelled() => return None,
                changed = statuses.changed() => changed.ok()?,
                changed = view.changed() => changed.ok()?,
            }
            // A burst of changes makes one event.
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            statuses.mark_unchanged();
            view.mark_unchanged();
            // Browsers drop events without data.
            Some((Ok(SseEvent::default().event("change").data("refresh")), (statuses, view, cancel)))
        });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

fn problems_list(out: &mut String, problems: &[Problem]) {
    if problems.is_empty() {
        return;
    }
    out.push_str("<ul class=\"problems\">");
    for problem in problems {
        let (class, word) = match problem.severity {
            Severity::Error => ("error", "Error"),
            Severity::Warning => ("warning", "Warning"),
        };
        let _ = write!(out, "<li class=\"{class}\"><b>{word}</b>");
        if let Some(file) = &problem.file {
            let _ = write!(out, "<code>{}", Text(file));
            if let Some(line) = problem.line {
                let _ = write!(out, ":{line}");
            }
            out.push_str("</code> ");
        }
        let _ = write!(out, "{}</li>", Message(&problem.message));
    }
    out.push_str("</ul>");
}

async fn overview(State(state): State<WebState>) -> Response {
    let view = state.view.borrow().clone();
    let Some(desired) = view.desired.clone() else { return not_ready() };
    let targets = Arc::clone(&state.targets.borrow());
    let now_ms = crate::time::now_ms();
    let now = now_ms / 1000;
    let mut tallies = state.registry.tallies(&targets, now_ms);
    let mut out = String::with_capacity(8192);
    let _ = write!(
        out,
        "<h1>Fleets</h1><p class=\"sub\">{} fleets from <code>{}</code> at commit {}",
        desired.fleets.len(),
        Text(&desired.branch),
        Short(Some(&desired.commit)),
    );
    if let Some(at) = view.reconciled_at {
        let _ = write!(out, ", reconciled {}", Time { unix_seconds: at, now });
    }
    out.push_str("</p>");
    let problems = view.problems();
    if !problems.is_empty() {
        let _ = write!(out, "<h2>Problems ({})</h2>", problems.len());
        problems_list(&mut out, &problems);
    }
    let _ = write!(
        out,
        "<table><thead><tr><th>Fleet</th><th>Version</th><th>Instances</th><th class=\"num\">In sync</th>\
         <th>Status</th><th class=\"num\" title=\"{DRIFT}\">Drift</th><th>Install token</th></tr></thead><tbody>",
    );
    for fleet in desired.fleets.values() {
        let name = fleet.name();
        let status = FleetStatus::of_tally(fleet, &desired, tallies.remove(name).unwrap_or_default());
        let follows_latest = matches!(fleet.spec.version, Some(crate::repo::manifest::VersionSelector::Latest));
        let mut version = match &status.tag {
            Some(tag) => format!("<code>{}</code>", Text(tag)),
            None => "<span class=\"muted\">observe only</span>".to_owned(),
        };
        if follows_latest {
            version.push_str(" <span class=\"tag t-latest\" title=\"version = &quot;latest&quot;: it follows the highest published version\">latest</span>");
        }
        if let Some(rollout) = &status.rollout {
            let _ = write!(version, " {}", RolloutTag(rollout));
        }
        if fleet.kept_last_good {
            version.push_str(" <span class=\"tag t-broken\" title=\"Its fleet file (or the version it names) cannot be used: the last good state is served; see the problems\">broken: kept</span>");
        }
        // Observe-only fleets have nothing to be in sync with: count what is observed.
        // During a rollout, what counts is how many run the new version.
        let in_sync = if status.tag.is_none() {
            format!("{} observed", status.instances)
        } else if let Some(rollout) = &status.rollout {
            format!("<span title=\"on {}\">{}/{} new</span>", Text(&rollout.to), rollout.on_new, status.instances)
        } else {
            format!("{}/{}", status.counts.in_sync, status.instances)
        };
        let token = view
            .fleet_tokens
            .get(name)
            .and_then(|tokens| tokens.current())
            .map(|current| match current.expires_at {
                Some(at) => {
                    format!("<code>{}</code>, expires {}", Text(&current.token.id), Time { unix_seconds: at, now })
                }
                None => format!("<code>{}</code>, never expires", Text(&current.token.id)),
            })
            .unwrap_or_else(|| "<span class=\"muted\">—</span>".to_owned());
        let _ = write!(
            out,
            "<tr><td><a href=\"/fleets/{}\"><b>{}</b></a><br><span class=\"muted\">{}</span></td><td>{version}</td>\
             <td>{}</td><td class=\"num\">{in_sync}</td><td>{}</td><td class=\"num\">{}</td><td>{token}</td></tr>",
            Url(name),
            Text(name),
            Text(&fleet.spec.description),
            match &status.rollout {
                Some(rollout) => RolloutBar { counts: &status.counts, on_new: rollout.on_new }.to_string(),
                None => Bar(&status.counts).to_string(),
            },
            Text(&status.description()),
            status.drift,
        );
    }
    out.push_str("</tbody></table>");
    let _ = write!(out, "<p class=\"note\"><b>Drift</b>: {DRIFT}.</p>");
    html::page("Fleets", Nav::Fleets, &out)
}

/// What drift means, wherever it is shown.
const DRIFT: &str = "instances whose served config is not their fleet's assigned config yet (a rollout in progress, \
     or an instance that failed or is away); it goes back to 0 as they pick up the assignment";

/// `?sort=host&order=desc&status=failed&page=2` on the fleet page.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct TableQuery {
    sort: Option<String>,
    order: Option<String>,
    status: Option<String>,
    page: Option<usize>,
}

/// The instance table's columns: query key, heading.
const COLUMNS: [(&str, &str); 10] = [
    ("instance", "Instance"),
    ("host", "Host"),
    ("os", "OS / arch"),
    ("version", "Collector"),
    ("assigned", "Assigned"),
    ("served", "Served"),
    ("status", "Status"),
    ("health", "Health"),
    ("last_seen", "Last seen"),
    ("error", "Error"),
];

fn sort_rows(rows: &mut [InstanceRow], column: &str, descending: bool) {
    let text = |value: &Option<String>| value.clone().unwrap_or_default().to_lowercase();
    match column {
        "host" => rows.sort_by_key(|r| text(&r.host)),
        "os" => rows.sort_by_key(|r| (text(&r.os), text(&r.arch))),
        "version" => rows.sort_by_key(|r| text(&r.agent_version)),
        "assigned" => rows.sort_by_key(|r| text(&r.assigned_tag)),
        "served" => rows.sort_by_key(|r| text(&r.served_hash)),
        "status" => rows.sort_by_key(|r| r.status),
        "health" => rows.sort_by_key(|r| r.healthy),
        "last_seen" => rows.sort_by_key(|r| r.last_seen_ms),
        "error" => rows.sort_by_key(|r| text(&r.error)),
        _ => rows.sort_by(|a, b| a.instance_uid.cmp(&b.instance_uid)),
    }
    if descending {
        rows.reverse();
    }
}

/// A link to the fleet page with one query value changed.
fn fleet_link(name: &str, sort: &str, descending: bool, status: Option<&str>, page: usize) -> String {
    let mut link = format!("/fleets/{}?sort={sort}", Url(name));
    if descending {
        link.push_str("&amp;order=desc");
    }
    if let Some(status) = status {
        let _ = write!(link, "&amp;status={}", Url(status));
    }
    if page > 1 {
        let _ = write!(link, "&amp;page={page}");
    }
    link
}

async fn fleet(State(state): State<WebState>, Path(name): Path<String>, Query(query): Query<TableQuery>) -> Response {
    // A row for every instance, sorted: tens of milliseconds at 20,000 instances, which
    // would hold up the OpAMP sessions sharing the runtime.
    tokio::task::spawn_blocking(move || fleet_page(&state, name, &query)).await.expect("rendering does not panic")
}

fn fleet_page(state: &WebState, name: String, query: &TableQuery) -> Response {
    let view = state.view.borrow().clone();
    let Some(desired) = view.desired.clone() else { return not_ready() };
    let Some(fleet) = desired.fleets.get(&name) else {
        return not_found(&format!("There is no fleet named “{name}”."));
    };
    let targets = Arc::clone(&state.targets.borrow());
    let now_ms = crate::time::now_ms();
    let now = now_ms / 1000;
    let replica = view.replica.clone();
    let records = match crate::opamp::persist::records_everywhere(&state.registry, &*state.store, &replica, Some(&name))
    {
        Ok(records) => records,
        Err(store_error) => return unavailable(&store_error.to_string()),
    };
    let mut rows: Vec<_> = records.iter().map(|record| record.row(&targets, now_ms)).collect();
    let status = FleetStatus::of(fleet, &desired, &rows);

    let mut out = String::with_capacity(16384 + rows.len().min(ROWS_PER_PAGE) * 900);
    let _ = write!(out, "<h1>{}</h1><p class=\"sub\">{}", Text(&name), Text(&fleet.spec.description));
    match fleet.assignment.as_deref() {
        Some(version) => {
            let rolling = targets.get(&name).and_then(|t| t.deciding()).is_some();
            let _ = write!(
                out,
                " · {} <a href=\"/configs/{}\"><code>{}</code></a> (config hash {})",
                if rolling { "rolling out" } else { "runs" },
                Url(&version.config),
                Text(&version.tag),
                Short(Some(&hex::encode(version.config_hash)))
            );
        }
        None => out.push_str(" · observe only: gitfleet never sends it a configuration"),
    }
    if let Some(commit) = &status.assigned_by {
        let _ = write!(out, ", set by commit {}", Short(Some(commit)));
    }
    let _ = write!(out, " · <code>{}</code></p>", Text(&fleet.spec.file));
    let fleet_problems: Vec<Problem> =
        view.problems().into_iter().filter(|p| p.file.as_deref() == Some(fleet.spec.file.as_str())).collect();
    problems_list(&mut out, &fleet_problems);

    // A rollout first: while it runs, it is what the fleet is doing.
    let target = targets.get(&name);
    let rollout = target.and_then(|t| t.rollout.as_deref()).filter(|r| !r.steps.is_empty());
    let step_counts = match target.and_then(|t| t.deciding().map(|deciding| (t, deciding))) {
        Some((target, (rollout, to))) => {
            let facts: Vec<_> = records
                .iter()
                .map(|record| record.rollout_fact(&rollout.steps, to, now_ms, target.stale_after_ms))
                .collect();
            rollout.counts(&facts)
        }
        None => Vec::new(),
    };
    if let Some(rollout) = rollout {
        rollout_section(&mut out, rollout, &step_counts, now);
    }

    // The stats strip: each number filters the table.
    let filter = query.status.as_deref().and_then(Status::parse);
    let sort = query.sort.as_deref().filter(|s| COLUMNS.iter().any(|(key, _)| key == s)).unwrap_or("instance");
    let descending = query.order.as_deref() == Some("desc");
    out.push_str("<div class=\"stats\">");
    let _ = write!(
        out,
        "<a class=\"stat\" href=\"{}\"{}><b>{}</b><span>instances</span></a>",
        fleet_link(&name, sort, descending, None, 1),
        if filter.is_none() { " aria-current=\"true\"" } else { "" },
        status.instances
    );
    for (status_kind, label) in [
        (Status::InSync, "in sync"),
        (Status::Failed, "apply failed"),
        (Status::Pending, "pending"),
        (Status::Applying, "applying"),
        (Status::Stale, "stale"),
        (Status::Observed, "observed"),
    ] {
        let count = status.counts.get(status_kind);
        if count == 0 && matches!(status_kind, Status::Applying | Status::Observed | Status::Pending) {
            continue;
        }
        let _ = write!(
            out,
            "<a class=\"stat s-{kind}\" href=\"{}\"{}><b>{count}</b><span>{label}</span></a>",
            fleet_link(&name, sort, descending, Some(status_kind.as_str()), 1),
            if filter == Some(status_kind) { " aria-current=\"true\"" } else { "" },
            kind = status_kind.as_str(),
        );
    }
    let _ = write!(out, "<div class=\"stat\" title=\"{DRIFT}\"><b>{}</b><span>drift</span></div>", status.drift);
    out.push_str("</div>");
    match rollout.filter(|r| r.state.is_active()) {
        Some(_) => {
            let on_new = step_counts.iter().map(|count| count.in_sync).sum();
            let _ = write!(out, "<p>{}</p>", RolloutBar { counts: &status.counts, on_new });
        }
        None => {
            let _ = write!(out, "<p>{}</p>", Bar(&status.counts));
        }
    }

    token_section(&mut out, &view, &name, &rows, now);

    if let Some(wanted) = filter {
        rows.retain(|row| row.status == wanted);
    }
    sort_rows(&mut rows, sort, descending);
    let pages = rows.len().div_ceil(ROWS_PER_PAGE).max(1);
    let page = query.page.unwrap_or(1).clamp(1, pages);
    let shown = &rows[(page - 1) * ROWS_PER_PAGE..(page * ROWS_PER_PAGE).min(rows.len())];
    let _ = write!(out, "<h2>Instances{}</h2>", filter.map(|s| format!(": {}", status_label(s))).unwrap_or_default());
    if rows.is_empty() {
        out.push_str("<p class=\"muted\">No instances here yet. Install files for this fleet are served at <code>/v1/install/</code> on the collector port.</p>");
        return html::page(&name, Nav::Fleets, &out);
    }
    out.push_str("<table><thead><tr>");
    for (key, heading) in COLUMNS {
        let (aria, next_descending) = match (key == sort, descending) {
            (true, false) => (" aria-sort=\"ascending\"", true),
            (true, true) => (" aria-sort=\"descending\"", false),
            (false, _) => ("", false),
        };
        let _ = write!(
            out,
            "<th><a href=\"{}\"{aria}>{heading}</a></th>",
            fleet_link(&name, key, next_descending, filter.map(Status::as_str), 1)
        );
    }
    out.push_str("</tr></thead><tbody>");
    for row in shown {
        let os_arch = match (&row.os, &row.arch) {
            (Some(os), Some(arch)) => format!("{} / {}", Text(os), Text(arch)),
            (Some(one), None) | (None, Some(one)) => Text(one).to_string(),
            (None, None) => "<span class=\"muted\">—</span>".to_owned(),
        };
        let health = match row.healthy {
            Some(true) => "healthy",
            Some(false) => "<span class=\"error-text\">unhealthy</span>",
            None => "<span class=\"muted\">—</span>",
        };
        let _ = write!(
            out,
            "<tr><td><a class=\"mono\" href=\"/instances/{uid}\" title=\"{uid}\">{short_uid}</a></td><td>{}</td><td>{os_arch}</td>\
             <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{health}</td><td>{}</td><td class=\"error-text\">{}</td></tr>",
            OrDash(row.host.as_deref()),
            OrDash(row.agent_version.as_deref()),
            row.assigned_tag.as_deref().map_or_else(
                || Short(row.assigned_hash.as_deref()).to_string(),
                |tag| match row.assigned_because.as_deref().filter(|because| *because != "fleet") {
                    Some(because) =>
                        format!("<code>{}</code> <span class=\"muted\">{}</span>", Text(tag), Text(because)),
                    None => format!("<code>{}</code>", Text(tag)),
                }
            ),
            Short(row.served_hash.as_deref()),
            Badge(row.status),
            Time { unix_seconds: row.last_seen_ms / 1000, now },
            Text(row.error.as_deref().unwrap_or_default()),
            uid = Text(&row.instance_uid),
            short_uid = Text(row.instance_uid.get(..8).unwrap_or(&row.instance_uid)),
        );
    }
    out.push_str("</tbody></table>");
    if pages > 1 {
        let _ = write!(out, "<p class=\"pager\">Page {page} of {pages} ({} instances) · ", rows.len());
        for number in 1..=pages {
            if number == page {
                let _ = write!(out, "<b>{number}</b> ");
            } else {
                let _ = write!(
                    out,
                    "<a href=\"{}\">{number}</a>",
                    fleet_link(&name, sort, descending, filter.map(Status::as_str), number)
                );
            }
        }
        out.push_str("</p>");
    }
    html::page(&name, Nav::Fleets, &out)
}

/// A rollout's state, its reason, and its steps with what each has done.
fn rollout_section(out: &mut String, rollout: &Rollout, counts: &[StepCounts], now: i64) {
    let _ = write!(
        out,
        "<h2>Rollout</h2><p><span class=\"tag r-{state}\">{label}</span> {from}<code>{to}</code>, started {started}",
        state = rollout.state.as_str(),
        label = rollout.state.as_str().replace('_', " "),
        from = rollout.from.as_ref().map(|from| format!("<code>{}</code> → ", Text(&from.tag))).unwrap_or_default(),
        to = Text(&rollout.to.tag),
        started = Time { unix_seconds: rollout.started_ms / 1000, now },
    );
    if let Some(replaced) = &rollout.replaced {
        let _ = write!(out, "; it replaced the rollout of <code>{}</code>", Text(replaced));
    }
    out.push_str("</p>");
    if let Some(reason) = &rollout.reason {
        let class = if matches!(rollout.state, RolloutState::Halted | RolloutState::RolledBack) { "error" } else { "" };
        let _ = write!(out, "<ul class=\"problems\"><li class=\"{class}\">{}</li></ul>", Message(reason));
    }
    out.push_str(
        "<table><thead><tr><th>Step</th><th>Selects</th><th>Max</th><th>Started</th><th class=\"num\">Moved</th>\
         <th class=\"num\">In sync</th><th class=\"num\">Failed</th><th class=\"num\">Skipped</th></tr></thead><tbody>",
    );
    for (index, step) in rollout.steps.iter().enumerate() {
        let count = counts.get(index).copied().unwrap_or_default();
        let current = rollout.state.is_active() && index == rollout.step;
        let started = match step.started_ms {
            Some(at) => Time { unix_seconds: at / 1000, now }.to_string(),
            None if step.hold => {
                "<span class=\"muted\">waits for a commit raising <code>release</code></span>".to_owned()
            }
            None => "<span class=\"muted\">—</span>".to_owned(),
        };
        let _ = write!(
            out,
            "<tr{}><td>{}{} {}</td><td>{}</td><td>{}</td><td>{started}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            if current { " aria-current=\"step\"" } else { "" },
            index + 1,
            if current { " ▸" } else { "" },
            Text(&step.name),
            Text(&step.selector.to_string()),
            step.max.map_or_else(|| "all".to_owned(), |max| max.to_string()),
            count.instances,
            count.in_sync,
            count.failed + count.unhealthy,
            count.skipped,
        );
    }
    out.push_str("</tbody></table>");
}

/// A small mark of a rollout's state, never green while it decides.
struct RolloutTag<'a>(&'a crate::status::RolloutStatus);

impl std::fmt::Display for RolloutTag<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rollout = self.0;
        let label = match rollout.state.as_str() {
            "running" => format!("step {}/{}", rollout.step, rollout.steps),
            "held" => format!("held at {}/{}", rollout.step, rollout.steps),
            "halted" => format!("halted at {}/{}", rollout.step, rollout.steps),
            other => other.replace('_', " "),
        };
        write!(
            f,
            "<span class=\"tag r-{}\" title=\"{}\">{}</span>",
            Text(&rollout.state),
            Text(rollout.reason.as_deref().unwrap_or("a rollout in progress")),
            Text(&label)
        )
    }
}

fn token_section(out: &mut String, view: &View, fleet: &str, rows: &[InstanceRow], now: i64) {
    let Some(tokens) = view.fleet_tokens.get(fleet) else { return };
    if tokens.statuses.is_empty() {
        return;
    }
    out.push_str(
        "<h2>Install tokens</h2><table><thead><tr><th>Token id</th><th>State</th><th>Issued</th><th>Expires</th>\
         <th>Retires</th><th class=\"num\">Instances</th></tr></thead><tbody>",
    );
    for token in &tokens.statuses {
        let id = token.token.id.as_str();
        let instances = rows.iter().filter(|row| row.token_id == id).count();
        let when = |at: Option<i64>| match at {
            Some(at) => Time { unix_seconds: at, now }.to_string(),
            None => "<span class=\"muted\">never</span>".to_owned(),
        };
        let state = serde_json::to_value(token.state(now)).ok().and_then(|v| v.as_str().map(str::to_owned));
        let _ = write!(
            out,
            "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{instances}</td></tr>",
            Text(id),
            OrDash(state.as_deref()),
            Time { unix_seconds: token.token.issued_at, now },
            when(token.expires_at),
            if token.retires_at.is_some() {
                when(token.retires_at)
            } else {
                "<span class=\"muted\">—</span>".to_owned()
            },
        );
    }
    out.push_str("</tbody></table>");
}

async fn instance(State(state): State<WebState>, Path(uid): Path<String>) -> Response {
    let Some(parsed) = InstanceUid::parse(&uid) else {
        return not_found("Instance ids are canonical UUIDs, like f81d4fae-7dec-11d0-a765-00a0c91e6bf6.");
    };
    let record = match crate::web::record_anywhere(&state, parsed).await {
        Ok(Some(record)) => record,
        Ok(None) => return not_found(&format!("There is no instance {parsed}.")),
        Err(store_error) => return unavailable(&store_error.to_string()),
    };
    let targets = Arc::clone(&state.targets.borrow());
    let now_ms = crate::time::now_ms();
    let now = now_ms / 1000;
    let row = record.row(&targets, now_ms);
    // The page shows what it can: a store that cannot be read leaves the section empty.
    let effective = crate::web::effective_config(&state.store, &record).await.ok().flatten().map(|e| e.body);

    let mut out = String::with_capacity(16384);
    let title = row.host.clone().unwrap_or_else(|| row.instance_uid.clone());
    let _ = write!(
        out,
        "<h1>{}</h1><p class=\"sub\">{} · fleet <a href=\"/fleets/{}\">{}</a> · <code>{}</code></p>",
        Text(&title),
        Badge(row.status),
        Url(&row.fleet),
        Text(&row.fleet),
        Text(&row.instance_uid),
    );
    if let Some(error) = &row.error {
        let _ = write!(out, "<ul class=\"problems\"><li class=\"error\"><b>Apply failed</b>{}</li></ul>", Text(error));
    }
    out.push_str("<div class=\"grid2\"><div class=\"card\"><h2>Configuration</h2><dl class=\"facts\">");
    let facts: [(&str, String); 8] = [
        (
            "Assigned",
            row.assigned_tag
                .as_deref()
                .map_or_else(|| "<span class=\"muted\">—</span>".into(), |t| format!("<code>{}</code>", Text(t))),
        ),
        ("Assigned hash", Short(row.assigned_hash.as_deref()).to_string()),
        ("Served hash", Short(row.served_hash.as_deref()).to_string()),
        ("Reported hash", Short(row.reported_hash.as_deref()).to_string()),
        ("Last seen", Time { unix_seconds: row.last_seen_ms / 1000, now }.to_string()),
        ("First seen", Time { unix_seconds: record.first_seen_ms / 1000, now }.to_string()),
        (
            "Connection",
            match (row.transport, row.connected) {
                (Some(transport), true) => format!("{transport}, connected"),
                (Some(transport), false) => format!("{transport}, not connected"),
                (None, _) => "<span class=\"muted\">—</span>".into(),
            },
        ),
        (
            "Install token",
            format!(
                "<code>{}</code>{}",
                Text(&row.token_id),
                if row.token_current { "" } else { " <span class=\"muted\">(an older token)</span>" }
            ),
        ),
    ];
    for (label, value) in facts {
        let _ = write!(out, "<dt>{label}</dt><dd>{value}</dd>");
    }
    out.push_str("</dl></div><div class=\"card\"><h2>Description</h2><dl class=\"facts\">");
    match record.description.as_deref() {
        Some(description) => {
            for (key, value) in description.identifying.iter().chain(&description.non_identifying) {
                let _ = write!(out, "<dt>{}</dt><dd>{}</dd>", Text(key), Text(value));
            }
        }
        None => out.push_str("<dt>—</dt><dd class=\"muted\">The instance has not described itself.</dd>"),
    }
    out.push_str("</dl></div></div>");

    out.push_str("<h2>Health</h2>");
    match record.health.as_deref() {
        Some(health) => {
            out.push_str("<table><thead><tr><th>Component</th><th>Healthy</th><th>Status</th><th>Last error</th></tr></thead><tbody>");
            let healthy = |ok: bool| if ok { "yes" } else { "<span class=\"error-text\">no</span>" };
            let _ = write!(
                out,
                "<tr><td><b>collector</b></td><td>{}</td><td>{}</td><td class=\"error-text\">{}</td></tr>",
                healthy(health.healthy),
                Text(&health.status),
                Text(&health.last_error)
            );
            for component in &health.components {
                let _ = write!(
                    out,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"error-text\">{}</td></tr>",
                    Text(&component.name),
                    healthy(component.healthy),
                    Text(&component.status),
                    Text(&component.last_error)
                );
            }
            out.push_str("</tbody></table>");
        }
        None => out.push_str("<p class=\"muted\">No health reported.</p>"),
    }

    out.push_str("<h2>Effective configuration</h2>");
    match effective.filter(|body| !body.is_empty()) {
        Some(body) => {
            let _ = write!(out, "<pre>{}</pre>", Text(&body));
        }
        None => out.push_str("<p class=\"muted\">Not reported.</p>"),
    }

    out.push_str("<h2>Components of its build</h2>");
    match record.components.as_deref().filter(|components| !components.is_empty()) {
        Some(components) => {
            let _ = write!(out, "<details><summary>{} components</summary>", components.len());
            out.push_str("<table><thead><tr><th>Kind</th><th>Component</th><th>Module</th></tr></thead><tbody>");
            for (kind, names) in &components.kinds {
                for (name, module) in names {
                    let _ = write!(
                        out,
                        "<tr><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
                        Text(kind),
                        Text(name),
                        Text(module)
                    );
                }
            }
            out.push_str("</tbody></table></details>");
        }
        None => out.push_str("<p class=\"muted\">Not reported.</p>"),
    }

    out.push_str("<h2>History</h2>");
    if record.history.is_empty() {
        out.push_str("<p class=\"muted\">Nothing yet.</p>");
    } else {
        out.push_str("<table><thead><tr><th>When</th><th>What</th></tr></thead><tbody>");
        for entry in record.history.iter().rev() {
            let what = match &entry.change {
                crate::instance::Change::Status { from, to } => format!("{} → {}", Badge(*from), Badge(*to)),
                crate::instance::Change::Assigned { tag, hash } => format!(
                    "assigned {}",
                    tag.as_deref()
                        .map_or_else(|| Short(hash.as_deref()).to_string(), |t| format!("<code>{}</code>", Text(t)))
                ),
                crate::instance::Change::NotRunning { hash, resent } => format!(
                    "reported {} applied while its collector runs no pipeline: {}",
                    Short(Some(hash)),
                    if *resent { "sent again" } else { "<span class=\"error-text\">failed</span>" }
                ),
                crate::instance::Change::RolledBack { failed_hash, running_hash, error } => format!(
                    "rolled back from {} to {}: <span class=\"error-text\">{}</span>",
                    Short(Some(failed_hash)),
                    Short(Some(running_hash)),
                    Text(error)
                ),
            };
            let _ = write!(out, "<tr><td>{}</td><td>{what}</td></tr>", Time { unix_seconds: entry.at_ms / 1000, now });
        }
        out.push_str("</tbody></table>");
    }
    html::page(&title, Nav::Fleets, &out)
}

async fn configs(State(state): State<WebState>) -> Response {
    let view = state.view.borrow().clone();
    let Some(desired) = view.desired.clone() else { return not_ready() };
    let now = crate::time::now_unix();
    let mut out = String::from(
        "<h1>Configurations</h1><p class=\"sub\">Publish a version with <code>git tag &lt;config&gt;/vN &amp;&amp; git push --tags</code>.</p>\
         <table><thead><tr><th>Configuration</th><th>Latest</th><th class=\"num\">Versions</th><th>Published</th><th>Fleets</th></tr></thead><tbody>",
    );
    for configuration in desired.configs.values() {
        let latest = configuration.latest();
        let fleets: Vec<String> = desired
            .fleets
            .values()
            .filter(|f| f.spec.config.as_deref() == Some(configuration.name.as_str()))
            .map(|f| format!("<a href=\"/fleets/{}\">{}</a>", Url(f.name()), Text(f.name())))
            .collect();
        let _ = write!(
            out,
            "<tr><td><a href=\"/configs/{}\"><b>{}</b></a></td><td>{}</td><td class=\"num\">{}</td><td>{}</td><td>{}</td></tr>",
            Url(&configuration.name),
            Text(&configuration.name),
            latest.map_or_else(
                || "<span class=\"muted\">none</span>".to_owned(),
                |v| format!("<code>{}</code>", Text(&v.tag))
            ),
            configuration.versions.len(),
            latest.map_or_else(String::new, |v| Time { unix_seconds: v.time, now }.to_string()),
            fleets.join(", "),
        );
    }
    out.push_str("</tbody></table>");
    html::page("Configurations", Nav::Configs, &out)
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct DiffQuery {
    from: Option<String>,
    to: Option<String>,
}

async fn config(State(state): State<WebState>, Path(name): Path<String>, Query(query): Query<DiffQuery>) -> Response {
    let view = state.view.borrow().clone();
    let Some(desired) = view.desired.clone() else { return not_ready() };
    let Some(configuration) = desired.configs.get(&name) else {
        return not_found(&format!("There is no configuration named “{name}”."));
    };
    let now = crate::time::now_unix();
    let mut out = String::with_capacity(16384);
    let deleted = if configuration.deleted.is_empty() {
        String::new()
    } else {
        format!(" · {} deleted", configuration.deleted.len())
    };
    let _ = write!(
        out,
        "<h1>{}</h1><p class=\"sub\">{}{deleted}{}</p>",
        Text(&name),
        count(configuration.versions.len(), "published version", "published versions"),
        configuration
            .head_file
            .as_deref()
            .map(|f| format!(" · <code>{}</code> on the branch", Text(f)))
            .unwrap_or_default()
    );
    let found = diff_section(&mut out, configuration, &query);
    out.push_str(
        "<h2>Versions</h2><table><thead><tr><th>Version</th><th>Commit</th><th>Published</th><th>Note</th>\
         <th>Config hash</th><th>Fleets</th><th>Compare</th></tr></thead><tbody>",
    );
    // Published and deleted versions together, newest first; only published ones compare.
    let mut rows: Vec<(&Arc<Version>, bool)> = configuration
        .versions
        .iter()
        .map(|v| (v, false))
        .chain(configuration.deleted.iter().map(|v| (v, true)))
        .collect();
    rows.sort_by(|a, b| compare_versions(&b.0.version, &a.0.version));
    let published: Vec<_> = configuration.versions.iter().rev().collect();
    for (version, is_deleted) in rows {
        let fleets: Vec<String> = desired
            .fleets
            .values()
            .filter(|f| f.assignment.as_ref().is_some_and(|a| a.tag == version.tag))
            .map(|f| format!("<a href=\"/fleets/{}\">{}</a>", Url(f.name()), Text(f.name())))
            .collect();
        let position = published.iter().position(|v| v.tag == version.tag);
        let compare = match position.and_then(|index| published.get(index + 1)) {
            _ if is_deleted => "<span class=\"muted\">—</span>".to_owned(),
            Some(previous) => format!(
                "<a href=\"/configs/{}?from={}&amp;to={}\">diff with {}</a>",
                Url(&name),
                Url(&previous.version),
                Url(&version.version),
                Text(&previous.version)
            ),
            None => "<span class=\"muted\">first</span>".to_owned(),
        };
        let mut marks = String::new();
        if is_deleted {
            marks.push_str(" <span class=\"tag t-deleted\" title=\"Its tag was deleted; it is not published any more\">deleted</span>");
        }
        if has_lint_errors(version) {
            marks.push_str(" <span class=\"tag t-broken\" title=\"It has configuration errors; no fleet is given it\">broken</span>");
        }
        let moved = version
            .moved_to
            .as_deref()
            .map(|to| format!(" <span class=\"tag t-moved\" title=\"The tag was moved; the first content seen is served\">moved to</span> {}", Short(Some(to))))
            .unwrap_or_default();
        let _ = write!(
            out,
            "<tr><td><a href=\"/configs/{}/{}\"><code>{}</code></a>{marks}</td><td>{}{moved}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{compare}</td></tr>",
            Url(&name),
            Url(&version.version),
            Text(&version.tag),
            Short(Some(&version.commit)),
            Time { unix_seconds: version.time, now },
            OrDash(version.note.as_deref()),
            Short(Some(&hex::encode(version.config_hash))),
            fleets.join(", "),
        );
    }
    out.push_str("</tbody></table>");
    let page = html::page(&name, Nav::Configs, &out);
    if found { page } else { (StatusCode::NOT_FOUND, page).into_response() }
}

/// Lints a version for the page (the server lints only the versions it assigns).
fn has_lint_errors(version: &Version) -> bool {
    lint::lint(&version.file, &version.body).iter().any(Problem::is_error)
}

/// One version: what it is, its problems and its whole content with line numbers.
async fn config_version(State(state): State<WebState>, Path((name, wanted)): Path<(String, String)>) -> Response {
    let view = state.view.borrow().clone();
    let Some(desired) = view.desired.clone() else { return not_ready() };
    let Some(configuration) = desired.configs.get(&name) else {
        return not_found(&format!("There is no configuration named “{name}”."));
    };
    let (version, is_deleted) = match (configuration.find(&wanted), configuration.find_deleted(&wanted)) {
        (Some(version), _) => (version, false),
        (None, Some(version)) => (version, true),
        (None, None) => return not_found(&format!("“{name}” has no version “{wanted}”.")),
    };
    let now = crate::time::now_unix();
    let mut out = String::with_capacity(version.body.len() * 2 + 4096);
    let _ = write!(
        out,
        "<h1>{}</h1><p class=\"sub\"><a href=\"/configs/{}\">{}</a> · <code>{}</code> at commit {}{}</p>",
        Text(&version.tag),
        Url(&name),
        Text(&name),
        Text(&version.file),
        Short(Some(&version.commit)),
        if is_deleted { " · its tag was deleted" } else { "" },
    );
    let mut problems = lint::lint(&format!("{}:{}", version.tag, version.file), &version.body);
    problems.sort_by_key(|p| p.severity);
    problems_list(&mut out, &problems);
    out.push_str("<dl class=\"facts card\">");
    let _ = write!(out, "<dt>Published</dt><dd>{}</dd>", Time { unix_seconds: version.time, now });
    let _ = write!(out, "<dt>Note</dt><dd>{}</dd>", OrDash(version.note.as_deref()));
    let _ = write!(out, "<dt>Config hash</dt><dd><code>{}</code></dd>", hex::encode(version.config_hash));
    if let Some(to) = &version.moved_to {
        let _ = write!(
            out,
            "<dt>Moved</dt><dd>the tag points at {} now; the content first seen at {} is what is served</dd>",
            Short(Some(to)),
            Short(Some(&version.commit))
        );
    }
    out.push_str("</dl><h2>Content</h2><pre class=\"diff\">");
    for (index, line) in String::from_utf8_lossy(&version.body).lines().enumerate() {
        let _ = write!(out, "<span class=\"same\"><b class=\"ln\">{}</b>{}</span>", index + 1, Text(line));
    }
    out.push_str("</pre>");
    html::page(&version.tag, Nav::Configs, &out)
}

/// The diff between `?from=` and `?to=` (by default the two newest versions), with the line
/// numbers of both sides. False when a version asked for is not published.
fn diff_section(out: &mut String, configuration: &Configuration, query: &DiffQuery) -> bool {
    let versions = &configuration.versions;
    let pick = |wanted: &Option<String>, fallback: Option<usize>| match wanted {
        Some(wanted) => configuration.find(wanted).cloned(),
        None => fallback.and_then(|index| versions.get(index).cloned()),
    };
    let newest = versions.len().checked_sub(1);
    let (Some(from), Some(to)) = (pick(&query.from, newest.and_then(|n| n.checked_sub(1))), pick(&query.to, newest))
    else {
        let missing: Vec<&str> = [&query.from, &query.to]
            .into_iter()
            .flatten()
            .filter(|wanted| configuration.find(wanted).is_none())
            .map(String::as_str)
            .collect();
        if missing.is_empty() {
            return true;
        }
        let _ = write!(
            out,
            "<ul class=\"problems\"><li class=\"error\"><b>Diff</b>{} published: nothing to compare.</li></ul>",
            Message(&format!(
                "`{}` {}",
                missing.join("` and `"),
                if missing.len() == 1 { "is not" } else { "are not" }
            ))
        );
        return false;
    };
    let _ = write!(out, "<h2>Changes from <code>{}</code> to <code>{}</code></h2>", Text(&from.tag), Text(&to.tag));
    let old = String::from_utf8_lossy(&from.body);
    let new = String::from_utf8_lossy(&to.body);
    if old == new {
        out.push_str("<p class=\"muted\">The two versions have the same content.</p>");
        return true;
    }
    let diff = similar::TextDiff::from_lines(old.as_ref(), new.as_ref());
    out.push_str("<pre class=\"diff\">");
    let number = |index: Option<usize>| index.map(|i| (i + 1).to_string()).unwrap_or_default();
    for (index, group) in diff.grouped_ops(3).iter().enumerate() {
        if index > 0 {
            out.push_str("<span class=\"hunk\">⋯</span>");
        }
        for op in group {
            for change in diff.iter_changes(op) {
                let class = match change.tag() {
                    similar::ChangeTag::Delete => "del",
                    similar::ChangeTag::Insert => "add",
                    similar::ChangeTag::Equal => "same",
                };
                let line = change.value().trim_end_matches(['\n', '\r']);
                let _ = write!(
                    out,
                    "<span class=\"{class}\"><b class=\"ln\">{}</b><b class=\"ln\">{}</b>{}</span>",
                    number(change.old_index()),
                    number(change.new_index()),
                    Text(line)
                );
            }
        }
    }
    out.push_str("</pre>");
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(uid: &str, host: Option<&str>, status: Status, last_seen_ms: i64) -> InstanceRow {
        InstanceRow {
            instance_uid: uid.into(),
            fleet: "f".into(),
            status,
            assigned_hash: None,
            assigned_tag: None,
            assigned_because: None,
            served_hash: None,
            reported_hash: None,
            reported_status: None,
            host: host.map(Into::into),
            os: None,
            arch: None,
            agent_version: None,
            healthy: None,
            last_seen_ms,
            error: None,
            transport: None,
            connected: false,
            token_id: "t".into(),
            token_current: true,
            drifted: false,
        }
    }

    #[test]
    fn instance_tables_sort_by_any_column() {
        let mut rows = vec![
            row("b", Some("Zeta"), Status::Failed, 30),
            row("a", None, Status::InSync, 10),
            row("c", Some("alpha"), Status::Stale, 20),
        ];
        let order = |rows: &[InstanceRow]| rows.iter().map(|r| r.instance_uid.clone()).collect::<Vec<_>>().join("");
        sort_rows(&mut rows, "host", false);
        assert_eq!(order(&rows), "acb", "no host first, then case-insensitive");
        sort_rows(&mut rows, "last_seen", true);
        assert_eq!(order(&rows), "bca");
        sort_rows(&mut rows, "status", false);
        assert_eq!(order(&rows), "abc");
        sort_rows(&mut rows, "anything else", false);
        assert_eq!(order(&rows), "abc");
    }

    #[test]
    fn fleet_links_keep_the_query() {
        assert_eq!(
            fleet_link("prod", "host", true, Some("failed"), 2),
            "/fleets/prod?sort=host&amp;order=desc&amp;status=failed&amp;page=2"
        );
        assert_eq!(fleet_link("prod", "instance", false, None, 1), "/fleets/prod?sort=instance");
    }
}
