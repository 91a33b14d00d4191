//! `GET /api/v1/...`: the JSON API, with the field names of PRODUCT.md §9.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::instance::Status;

use crate::opamp::codec::InstanceUid;
use crate::opamp::registry::{FleetSummary, FleetTarget, InstanceRecord, Targets};
use crate::reconciler::View;
use crate::repo::desired::{Configuration, Fleet, Version};
use crate::rollout::{Rollout, StepCounts};
use crate::time::rfc3339;
use crate::web::WebState;

pub fn routes() -> Router<WebState> {
    Router::new()
        .route("/api/v1/repo", get(repo))
        .route("/api/v1/fleets", get(fleets))
        .route("/api/v1/fleets/{name}", get(fleet))
        .route("/api/v1/fleets/{name}/instances", get(fleet_instances))
        .route("/api/v1/instances", get(instances))
        .route("/api/v1/instances/{uid}", get(instance))
        .route("/api/v1/configs", get(configs))
        .route("/api/v1/configs/{name}", get(config))
        .route("/api/v1/configs/{name}/versions", get(config_versions))
        .route("/api/v1/configs/{name}/versions/{version}", get(config_version))
}

pub fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

pub fn not_found(message: &str) -> Response {
    error(StatusCode::NOT_FOUND, message)
}

fn not_ready() -> Response {
    error(StatusCode::SERVICE_UNAVAILABLE, "the repository has not been read yet")
}

async fn repo(State(state): State<WebState>) -> Response {
    let view = state.view.borrow().clone();
    Json(repo_json(&view)).into_response()
}

pub fn repo_json(view: &View) -> Value {
    let desired = view.desired.as_deref();
    json!({
        "commit": desired.map(|d| d.commit.clone()),
        "branch": desired.map(|d| d.branch.clone()),
        "commit_time": desired.map(|d| rfc3339(d.commit_time)),
        "reconciled_at": view.reconciled_at.map(rfc3339),
        "reconcile_duration_ms": view.reconcile_micros as f64 / 1000.0,
        "fetches": view.fetches,
        "last_fetched_at": view.last_fetched_at.map(rfc3339),
        "problems": view.problems(),
        "replica": { "name": view.replica, "leading": view.leading, "leader": view.leader },
    })
}

async fn fleets(State(state): State<WebState>) -> Response {
    let view = state.view.borrow().clone();
    let Some(desired) = &view.desired else { return not_ready() };
    let targets = Arc::clone(&state.targets.borrow());
    let summaries = state.registry.summaries(&targets, crate::time::now_ms());
    let fleets: Vec<Value> = desired
        .fleets
        .values()
        .map(|fleet| {
            let summary = summaries.get(fleet.name()).cloned().unwrap_or_default();
            fleet_json(fleet, &view, targets.get(fleet.name()), summary)
        })
        .collect();
    Json(json!({ "fleets": fleets })).into_response()
}

async fn fleet(State(state): State<WebState>, Path(name): Path<String>) -> Response {
    let view = state.view.borrow().clone();
    let Some(desired) = &view.desired else { return not_ready() };
    let Some(fleet) = desired.fleets.get(&name) else {
        return not_found(&format!("no fleet named `{}`", name.escape_default()));
    };
    let targets = Arc::clone(&state.targets.borrow());
    let summary =
        state.registry.summaries(&targets, crate::time::now_ms()).get(name.as_str()).cloned().unwrap_or_default();
    Json(fleet_json(fleet, &view, targets.get(&name), summary)).into_response()
}

/// `?status=failed&fleet=prod&limit=100&cursor=<instance_uid>` on the instance lists.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct InstanceQuery {
    status: Option<String>,
    fleet: Option<String>,
    /// At most this many instances (1 to `MAX_LIMIT`); all of them without it.
    limit: Option<usize>,
    /// The `next_cursor` of the previous page: instances after this `instance_uid`.
    cursor: Option<String>,
    /// With `true`, each instance carries every attribute it reported (`attributes`), as
    /// rollout steps select by them.
    attributes: bool,
}

const MAX_LIMIT: usize = 10_000;

async fn fleet_instances(
    State(state): State<WebState>,
    Path(name): Path<String>,
    Query(query): Query<InstanceQuery>,
) -> Response {
    list_instances(&state, Some(name), query).await
}

async fn instances(State(state): State<WebState>, Query(query): Query<InstanceQuery>) -> Response {
    let fleet = query.fleet.clone();
    list_instances(&state, fleet, query).await
}

/// Instances in `instance_uid` order, filtered and paged; `next_cursor` is set when more
/// follow.
async fn list_instances(state: &WebState, fleet: Option<String>, query: InstanceQuery) -> Response {
    let view = state.view.borrow().clone();
    if let Some(fleet) = &fleet {
        let Some(desired) = &view.desired else { return not_ready() };
        if !desired.fleets.contains_key(fleet) {
            return not_found(&format!("no fleet named `{}`", fleet.escape_default()));
        }
    }
    let wanted = match query.status.as_deref().map(Status::parse) {
        None => None,
        Some(Some(status)) => Some(status),
        Some(None) => {
            let known: Vec<&str> = Status::ALL.iter().map(|s| s.as_str()).collect();
            return error(StatusCode::BAD_REQUEST, &format!("`status` is one of {}", known.join(", ")));
        }
    };
    let limit = match query.limit {
        Some(limit) if !(1..=MAX_LIMIT).contains(&limit) => {
            return error(StatusCode::BAD_REQUEST, &format!("`limit` is from 1 to {MAX_LIMIT}"));
        }
        limit => limit.unwrap_or(usize::MAX),
    };
    let after = match query.cursor.as_deref().map(InstanceUid::parse) {
        None => None,
        Some(Some(uid)) => Some(uid),
        Some(None) => return error(StatusCode::BAD_REQUEST, "`cursor` is the `next_cursor` of the previous page"),
    };
    let targets = Arc::clone(&state.targets.borrow());
    let now = crate::time::now_ms();
    let records = match crate::web::records_everywhere(state, fleet.as_deref()).await {
        Ok(records) => records,
        Err(store_error) => return error(StatusCode::SERVICE_UNAVAILABLE, &store_error.to_string()),
    };
    let mut rows = records
        .iter()
        .filter(|record| after.is_none_or(|after| record.uid > after))
        .map(|record| (record.uid, record.row(&targets, now)))
        .filter(|(_, row)| wanted.is_none_or(|status| row.status == status));
    let page: Vec<_> = rows.by_ref().take(limit).collect();
    let next_cursor = match rows.next() {
        Some(_) => page.last().map(|(uid, _)| uid.to_string()),
        None => None,
    };
    let by_uid: std::collections::HashMap<InstanceUid, &InstanceRecord> =
        if query.attributes { records.iter().map(|record| (record.uid, record)).collect() } else { Default::default() };
    let json_of = |(uid, row): &(InstanceUid, crate::status::InstanceRow)| {
        let mut value = row.to_json();
        if let Some(record) = by_uid.get(uid) {
            let attributes: serde_json::Map<String, Value> = record
                .description
                .iter()
                .flat_map(|d| d.identifying.iter().chain(&d.non_identifying))
                .map(|(key, value)| (key.clone(), json!(value)))
                .collect();
            value["attributes"] = Value::Object(attributes);
        }
        value
    };
    Json(json!({
        "instances": page.iter().map(json_of).collect::<Vec<_>>(),
        "next_cursor": next_cursor,
    }))
    .into_response()
}

async fn instance(State(state): State<WebState>, Path(uid): Path<String>) -> Response {
    let Some(parsed) = InstanceUid::parse(&uid) else {
        return error(
            StatusCode::BAD_REQUEST,
            "instance ids are canonical UUIDs, like f81d4fae-7dec-11d0-a765-00a0c91e6bf6",
        );
    };
    let record = match crate::web::record_anywhere(&state, parsed).await {
        Ok(Some(record)) => record,
        Ok(None) => return not_found(&format!("no instance {parsed}")),
        Err(store_error) => return error(StatusCode::SERVICE_UNAVAILABLE, &store_error.to_string()),
    };
    let targets = Arc::clone(&state.targets.borrow());
    let mut value = instance_json(&record, &targets, crate::time::now_ms());
    value["description"] = json!(record.description);
    value["health"] = json!(record.health);
    value["effective_config"] = match crate::web::effective_config(&state.store, &record).await {
        Ok(effective) => json!(effective),
        Err(store_error) => return error(StatusCode::SERVICE_UNAVAILABLE, &store_error.to_string()),
    };
    value["available_components"] = match record.components.as_deref() {
        Some(components) => {
            let mut value = json!(components.kinds);
            value["hash"] = json!(hex::encode(&components.hash));
            value
        }
        None => Value::Null,
    };
    value["capabilities"] = json!(record.config.capabilities);
    value["first_seen"] = json!(rfc3339(record.first_seen_ms / 1000));
    let events: Vec<Value> = record
        .history
        .iter()
        .rev()
        .map(|entry| {
            let mut event = json!(entry.change);
            event["at"] = json!(rfc3339(entry.at_ms / 1000));
            event
        })
        .collect();
    value["events"] = Value::Array(events);
    Json(value).into_response()
}

/// One instance with the field names of PRODUCT.md §9.
pub fn instance_json(record: &InstanceRecord, targets: &Targets, now_ms: i64) -> Value {
    record.row(targets, now_ms).to_json()
}

/// `target` is what the fleet's instances are being served now; its assignment gives the
/// `tag` and `config_hash`, so that they always match the counts (the desired state is
/// published a moment before the targets follow it).
pub fn fleet_json(fleet: &Fleet, view: &View, target: Option<&FleetTarget>, summary: FleetSummary) -> Value {
    let spec = &fleet.spec;
    let now = crate::time::now_unix();
    let tokens: Vec<Value> = view
        .fleet_tokens
        .get(fleet.name())
        .map(|tokens| tokens.statuses.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|status| {
            json!({
                "id": status.token.id,
                "issued_at": rfc3339(status.token.issued_at),
                "expires_at": status.expires_at.map(rfc3339),
                "retires_at": status.retires_at.map(rfc3339),
                "state": status.state(now),
                "instances": summary.by_token.get(status.token.id.as_str()).copied().unwrap_or(0),
            })
        })
        .collect();
    let current = tokens.first().cloned();
    let on_old_tokens =
        summary.instances - current.as_ref().and_then(|t| t["instances"].as_u64()).unwrap_or(0) as usize;
    let assignment = fleet.assignment.as_deref();
    let (tag, config_hash) = match target {
        Some(target) => {
            let serving = target.version.as_ref().map(|v| &v.assignment);
            (serving.map(|a| a.tag.clone()), serving.map(|a| hex::encode(&a.hash)))
        }
        None => (assignment.map(|v| v.tag.clone()), assignment.map(|v| hex::encode(v.config_hash))),
    };
    let version = tag.as_deref().and_then(|tag| tag.split_once('/')).map(|(_, version)| version.to_owned());
    json!({
        "name": spec.name,
        "description": spec.description,
        "file": spec.file,
        "config": spec.config,
        "version": version,
        "selector": spec.version.as_ref().map(ToString::to_string),
        "tag": tag,
        "config_hash": config_hash,
        "observe_only": spec.observe_only(),
        "kept_last_good": fleet.kept_last_good,
        "instances": summary.instances,
        "counts": summary.counts,
        "drift": summary.drift,
        "token": current,
        "tokens": tokens,
        "instances_on_old_tokens": on_old_tokens,
        "stale_after_seconds": spec.health.stale_after.as_secs(),
        "rollout": target.and_then(|t| t.rollout.as_deref()).map(|rollout| rollout_json(rollout, &summary.steps)),
        "install": {
            "endpoint": spec.install.endpoint,
            "collector_version": spec.install.collector_version,
            "supervisor_version": spec.install.supervisor_version,
        },
    })
}

/// A fleet's rollout: where it is, each step with its counts, and why it stopped.
pub fn rollout_json(rollout: &Rollout, counts: &[StepCounts]) -> Value {
    let at = |ms: i64| rfc3339(ms.div_euclid(1000));
    let steps: Vec<Value> = rollout
        .steps
        .iter()
        .enumerate()
        .map(|(index, step)| {
            let counts = counts.get(index).copied().unwrap_or_default();
            json!({
                "name": step.name,
                "selector": step.selector.to_string(),
                "max": step.max.map(|max| max.to_string()),
                "hold": step.hold,
                "started_at": step.started_ms.map(at),
                "instances": counts.instances,
                "in_sync": counts.in_sync,
                "failed": counts.failed,
                "unhealthy": counts.unhealthy,
                "skipped": counts.skipped,
            })
        })
        .collect();
    json!({
        "state": rollout.state.as_str(),
        "from": rollout.from.as_ref().map(|from| &from.tag),
        "to": rollout.to.tag,
        "step": (rollout.step + 1).min(rollout.steps.len()),
        "steps_total": rollout.steps.len(),
        "steps": steps,
        "started_at": at(rollout.started_ms),
        "changed_at": at(rollout.changed_ms),
        "baking_since": rollout.settled_since_ms.map(at),
        "reason": rollout.reason,
        "replaced": rollout.replaced,
    })
}

async fn configs(State(state): State<WebState>) -> Response {
    let view = state.view.borrow().clone();
    let Some(desired) = &view.desired else { return not_ready() };
    Json(json!({ "configs": desired.configs.values().map(config_json).collect::<Vec<_>>() })).into_response()
}

async fn config(State(state): State<WebState>, Path(name): Path<String>) -> Response {
    let view = state.view.borrow().clone();
    let Some(desired) = &view.desired else { return not_ready() };
    match desired.configs.get(&name) {
        Some(configuration) => Json(config_json(configuration)).into_response(),
        None => not_found(&format!("no configuration named `{}`", name.escape_default())),
    }
}

fn config_json(configuration: &Configuration) -> Value {
    json!({
        "name": configuration.name,
        "file": configuration.head_file,
        "latest": configuration.latest().map(|v| v.version.clone()),
        "versions": configuration.versions.len(),
        "deleted_versions": configuration.deleted.len(),
    })
}

async fn config_versions(State(state): State<WebState>, Path(name): Path<String>) -> Response {
    let view = state.view.borrow().clone();
    let Some(desired) = &view.desired else { return not_ready() };
    match desired.configs.get(&name) {
        Some(configuration) => Json(json!({
            "config": configuration.name,
            // Newest first, as people read release lists.
            "versions": configuration.versions.iter().rev().map(|v| version_json(v, false)).collect::<Vec<_>>(),
            // Published once, tags gone since: not selectable, kept by fleets that run them.
            "deleted": configuration.deleted.iter().rev().map(|v| version_json(v, false)).collect::<Vec<_>>(),
        }))
        .into_response(),
        None => not_found(&format!("no configuration named `{}`", name.escape_default())),
    }
}

async fn config_version(State(state): State<WebState>, Path((name, version)): Path<(String, String)>) -> Response {
    let view = state.view.borrow().clone();
    let Some(desired) = &view.desired else { return not_ready() };
    let configuration = desired.configs.get(&name);
    let published = configuration.and_then(|c| c.find(&version));
    match (published, configuration.and_then(|c| c.find_deleted(&version))) {
        (Some(found), _) => Json(version_json(found, true)).into_response(),
        (None, Some(deleted)) => {
            let mut value = version_json(deleted, true);
            value["deleted"] = Value::Bool(true);
            Json(value).into_response()
        }
        (None, None) => not_found(&format!("no version `{}` of `{}`", version.escape_default(), name.escape_default())),
    }
}

fn version_json(version: &Version, with_content: bool) -> Value {
    let mut value = json!({
        "version": version.version,
        "tag": version.tag,
        "commit": version.commit,
        "date": rfc3339(version.time),
        "note": version.note,
        "file": version.file,
        "content_type": version.content_type,
        "config_hash": hex::encode(version.config_hash),
        // Everything above is what was first seen, and served; this is where the tag is now.
        "moved_to": version.moved_to,
    });
    if with_content {
        value["content"] = Value::String(String::from_utf8_lossy(&version.body).into_owned());
    }
    value
}
