//! The people port (4321): the status page, the JSON API, metrics, health endpoints and the
//! Git webhook.
//! Read-only: nothing here changes desired state; the webhook only asks the watcher to look.

pub mod api;
pub mod html;
pub mod metrics;
pub mod pages;

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::git::watcher::Trigger;
use crate::git::webhook::{self, Signatures};
use crate::reconciler::View;

/// Largest webhook payload accepted (forges send a few KB; GitHub caps at 25 MB).
const MAX_WEBHOOK_BYTES: usize = 1024 * 1024;

#[derive(Clone)]
pub struct WebState {
    pub view: watch::Receiver<Arc<View>>,
    pub registry: Arc<crate::opamp::registry::Registry>,
    pub store: Arc<dyn crate::store::Store>,
    pub targets: watch::Receiver<Arc<crate::opamp::registry::Targets>>,
    pub triggers: mpsc::Sender<Trigger>,
    pub webhook_secret: Option<Arc<[u8]>>,
    /// Changes whenever a fleet's status does: the page's live updates follow it.
    pub statuses: watch::Receiver<Arc<crate::reporting::Statuses>>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Ends live-update streams at shutdown.
    pub cancel: tokio_util::sync::CancellationToken,
}

pub fn router(state: WebState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/hooks/git", post(git_hook))
        .route("/metrics", get(metrics::metrics))
        .merge(api::routes())
        .merge(pages::routes())
        .fallback(|| async { api::not_found("no such page") })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_WEBHOOK_BYTES))
        .with_state(state)
}

/// An instance's effective config: in memory until the store has it, then read back from
/// the store (it can be tens of KB per collector).
pub async fn effective_config(
    store: &Arc<dyn crate::store::Store>,
    record: &crate::opamp::registry::InstanceRecord,
) -> Result<Option<crate::opamp::registry::EffectiveConfig>, crate::store::StoreError> {
    if let Some(effective) = &record.effective_config {
        return Ok(Some((**effective).clone()));
    }
    let (store, uid) = (Arc::clone(store), record.uid.0);
    let stored =
        tokio::task::spawn_blocking(move || store.effective_config(uid)).await.expect("the store does not panic")?;
    Ok(stored.and_then(|text| serde_json::from_str(&text).ok()))
}

/// Every instance of `fleet` (or of every fleet), whichever replica holds it.
pub async fn records_everywhere(
    state: &WebState,
    fleet: Option<&str>,
) -> Result<Vec<crate::opamp::registry::InstanceRecord>, crate::store::StoreError> {
    let replica = state.view.borrow().replica.clone();
    let (registry, store, fleet) = (Arc::clone(&state.registry), Arc::clone(&state.store), fleet.map(str::to_owned));
    tokio::task::spawn_blocking(move || {
        crate::opamp::persist::records_everywhere(&registry, &*store, &replica, fleet.as_deref())
    })
    .await
    .expect("reading does not panic")
}

/// One instance, whichever replica holds it.
pub async fn record_anywhere(
    state: &WebState,
    uid: crate::opamp::codec::InstanceUid,
) -> Result<Option<crate::opamp::registry::InstanceRecord>, crate::store::StoreError> {
    crate::opamp::persist::record_anywhere(&state.registry, &state.store, uid).await
}

/// Ready once the first reconcile has produced a desired state.
async fn readyz(State(state): State<WebState>) -> Response {
    if state.view.borrow().desired.is_some() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: the repository has not been read yet\n").into_response()
    }
}

async fn git_hook(State(state): State<WebState>, headers: HeaderMap, body: Bytes) -> Response {
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    if let Some(secret) = &state.webhook_secret {
        let signatures = Signatures {
            hub_signature_256: header("x-hub-signature-256"),
            gitea_signature: header("x-gitea-signature"),
            gitlab_token: header("x-gitlab-token"),
        };
        match webhook::verify(secret, &body, signatures) {
            Ok(forge) => info!(?forge, "webhook delivery verified"),
            Err(error) => {
                warn!(%error, "webhook delivery refused");
                return api::error(StatusCode::UNAUTHORIZED, &error.to_string());
            }
        }
    }
    if state.view.borrow().leading {
        // A full queue already holds a trigger, so this one is not needed.
        let _ = state.triggers.try_send(Trigger::Webhook);
    } else {
        // Another replica fetches: ask it through the store.
        let store = Arc::clone(&state.store);
        let relayed =
            tokio::task::spawn_blocking(move || store.request_fetch()).await.expect("the store does not panic");
        if let Err(error) = relayed {
            warn!(%error, "cannot pass the webhook on to the leader");
            let message = format!("this replica does not lead and cannot reach the leader: {error}");
            return api::error(StatusCode::SERVICE_UNAVAILABLE, &message);
        }
    }
    (StatusCode::ACCEPTED, axum::Json(serde_json::json!({ "status": "fetch scheduled" }))).into_response()
}
