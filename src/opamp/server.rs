//! Port 4320: `/v1/opamp`, OpAMP over WebSocket and plain HTTP on the same path.
//!
//! A `POST` with `Content-Type: application/x-protobuf` is plain HTTP; anything else is a
//! WebSocket upgrade. Both need `Authorization: Bearer <install token>`, which decides the
//! fleet. Each WebSocket is one task that selects over its socket, changes of its fleet's
//! target (pushed at once), and shutdown.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::install::token::TokenIndex;
use crate::metrics::Metrics;
use crate::opamp::agent::{self, Connection};
use crate::opamp::codec::InstanceUid;
use crate::opamp::codec::{self, DecodeError, MAX_MESSAGE_BYTES};
use crate::opamp::proto::AgentToServer;
use crate::opamp::proto::ServerToAgent;
use crate::opamp::registry::{Registry, ServedVersion, Targets, Transport};
use crate::opamp::rollouts::{self, RolloutBook};
use crate::opamp::ws::{self, FrameReader, Incoming, WsError};
use crate::reconciler::View;
use crate::rollout::Rollout;

const PROTOBUF: &str = "application/x-protobuf";
/// Seconds an agent turned away should wait (opamp.md §1.4 recommends at least 30).
const RETRY_AFTER_SECONDS: u64 = 30;
/// Replies smaller than this are not worth gzipping.
const GZIP_FROM: usize = 1024;

#[derive(Clone)]
pub struct OpampState {
    pub registry: Arc<Registry>,
    pub targets: watch::Receiver<Arc<Targets>>,
    pub view: watch::Receiver<Arc<View>>,
    /// Changes whenever a token may have become refused (revoked, expired, retired), so
    /// that live sessions on it are closed at once.
    pub tokens: watch::Receiver<Arc<TokenIndex>>,
    /// The endpoints agents dialled, shared: thousands of connections name a handful.
    pub dialled: Arc<crate::opamp::registry::Interner>,
    /// `<data-dir>/install`: each fleet's install files, served at `/v1/install/<file>`.
    pub install_dir: std::path::PathBuf,
    /// Live WebSockets plus HTTP requests in flight.
    pub connections: Arc<AtomicUsize>,
    pub max_connections: usize,
    /// Whether this port terminates TLS itself (`--tls-cert`).
    pub tls: bool,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// What messages still arriving may hold, over every connection.
    pub assembling: ws::Budget,
    /// Reads instances that moved here from another replica (a shared store only).
    pub adopter: Option<crate::opamp::persist::Adopter>,
    pub cancel: CancellationToken,
}

/// The memory every WebSocket together may hold in messages still arriving: 32 of the
/// largest messages at once.
pub const ASSEMBLING_BUDGET: usize = 32 * MAX_MESSAGE_BYTES;

/// How long a message may take from its first byte to its last.
const MESSAGE_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

pub fn router(state: OpampState) -> Router {
    Router::new()
        .route("/v1/opamp", any(opamp))
        .route("/v1/install/{file}", get(install_file))
        .fallback(|| async {
            (StatusCode::NOT_FOUND, "OpAMP is served at /v1/opamp, install files at /v1/install/<file>\n")
        })
        .with_state(state)
}

/// Counts a connection while it lives.
struct ConnectionSlot(Arc<AtomicUsize>);

impl ConnectionSlot {
    fn take(state: &OpampState) -> Option<Self> {
        let previous = state.connections.fetch_add(1, Ordering::AcqRel);
        if previous >= state.max_connections {
            state.connections.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Self(Arc::clone(&state.connections)))
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn plain(status: StatusCode, message: &str) -> Response {
    (status, format!("{message}\n")).into_response()
}

/// Counts a message sent to an agent, and the remote config it carries, if any.
fn count_sent(metrics: &Metrics, remote_config: bool) {
    Metrics::count(&metrics.opamp_messages_out);
    if remote_config {
        Metrics::count(&metrics.remote_configs_out);
    }
}

/// Why a message that would create an instance is refused (`NewInstanceLimit`).
const TOO_MANY_NEW: &str = "this token has created too many new instances; try again later";
/// The spec's least recommended retry interval.
const TOO_MANY_NEW_RETRY_AFTER: &str = "30";

fn unauthorized(refused: &str) -> Response {
    let mut response = plain(StatusCode::UNAUTHORIZED, &format!("unauthorized: {refused}"));
    response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// `GET /v1/install/<file>`: one of the install files of the fleet whose current token the
/// request carries. A token in its grace period does not download the new one.
async fn install_file(
    State(state): State<OpampState>,
    axum::extract::Path(file): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let view = Arc::clone(&state.view.borrow());
    let fleet = match view.tokens.authenticate(authorization, crate::time::now_unix()) {
        Ok(token) => {
            if let Some(removed) = view.removed_fleets.get(&token.fleet) {
                let message = format!(
                    "fleet `{}` was removed from the repository: nothing is installed into it (its collectors may still connect until {})",
                    token.fleet,
                    crate::time::rfc3339(removed.until)
                );
                return plain(StatusCode::GONE, &message);
            }
            let current = view.fleet_tokens.get(&token.fleet).and_then(|tokens| tokens.current());
            if current.is_none_or(|current| current.token.id != token.id) {
                return unauthorized("install files need the fleet's current token");
            }
            token.fleet.clone()
        }
        Err(refused) => return unauthorized(&refused.to_string()),
    };
    let set = state.install_dir.join(&fleet);
    // One of the set, or a release file the set serves (from --artifacts-dir).
    let release = crate::install::files::served_release(&set, &file);
    let path = match &release {
        Some(path) => path.clone(),
        None if crate::install::files::served_names(&fleet).contains(&file) => set.join(&file),
        None => {
            let mut names = crate::install::files::served_names(&fleet);
            // The CA is in the set only where the fleet has one.
            if !set.join("ca.pem").is_file() {
                names.retain(|name| name != "ca.pem");
            }
            let names = names.join(", ");
            return plain(
                StatusCode::NOT_FOUND,
                &format!("no install file `{}`; there are: {names}", file.escape_default()),
            );
        }
    };
    let opened = match tokio::fs::File::open(&path).await {
        Ok(opened) => opened,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound && release.is_some() => {
            warn!(path = %path.display(), "a release file the install files name is gone from --artifacts-dir");
            return plain(StatusCode::NOT_FOUND, "this release file is no longer on the server");
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound && file == "ca.pem" => {
            let message = "this fleet's set has no ca.pem: the server has no --install-ca-file, or the fleet's endpoint is not TLS";
            return plain(StatusCode::NOT_FOUND, message);
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let mut response = plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "the install files of this fleet are being written; retry shortly",
            );
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            return response;
        }
        Err(error) => {
            warn!(path = %path.display(), %error, "cannot read an install file");
            return plain(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the install file");
        }
    };
    let length = opened.metadata().await.map(|m| m.len()).ok();
    let content_type = match file.rsplit_once('.').map(|(_, ext)| ext) {
        _ if release.is_some() && !file.ends_with(".gz") => "application/octet-stream",
        Some("gz") => "application/gzip",
        Some("yaml") => "application/yaml",
        Some("sh") => "text/x-shellscript; charset=utf-8",
        _ => "text/plain; charset=utf-8",
    };
    info!(fleet = %fleet, file = %file, "serving an install file");
    let mut response = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_DISPOSITION, format!("attachment; filename=\"{file}\""))
        .header(header::CACHE_CONTROL, "no-store");
    if let Some(length) = length {
        response = response.header(header::CONTENT_LENGTH, length);
    }
    response.body(Body::from_stream(tokio_util::io::ReaderStream::new(opened))).expect("a valid response")
}

async fn opamp(State(state): State<OpampState>, request: Request) -> Response {
    let authorization = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let tokens = {
        let view = state.view.borrow();
        if view.desired.is_none() {
            // Tokens are known from the first reconcile on: until then no token is refused,
            // every collector is asked to come back.
            let mut response = plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "gitfleet is starting and has not loaded its fleets yet; retry shortly",
            );
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return response;
        }
        Arc::clone(&view.tokens)
    };
    let token = match tokens.authenticate(authorization, crate::time::now_unix()) {
        Ok(token) => token.clone(),
        Err(refused) => {
            debug!(reason = %refused, "OpAMP request refused");
            return unauthorized(&refused.to_string());
        }
    };
    let Some(slot) = ConnectionSlot::take(&state) else {
        let mut response = plain(StatusCode::SERVICE_UNAVAILABLE, "too many connections; retry later");
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
        return response;
    };
    let is_http = request.method() == Method::POST
        && request.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes() == PROTOBUF.as_bytes());
    let connection = Connection {
        fleet: state.registry.name(&token.fleet),
        token_id: state.registry.name(&token.id),
        transport: Transport::Http,
        session: None,
        first_reply: true,
        uid: None,
        wire_uid: Vec::new(),
        dialled: dialled_endpoint(request.headers(), is_http, state.tls)
            .map(|endpoint| state.dialled.intern(&endpoint)),
        offered: None,
    };
    if is_http {
        let response = plain_http(&state, connection, request).await;
        drop(slot);
        return response;
    }
    upgrade(request, state, connection, slot)
}

/// Answers a WebSocket upgrade (RFC 6455 §4.2) and starts the session once hyper hands over
/// the connection.
fn upgrade(mut request: Request, state: OpampState, connection: Connection, slot: ConnectionSlot) -> Response {
    let headers = request.headers();
    let has_token = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if request.method() != Method::GET
        || !has_token(header::CONNECTION, "upgrade")
        || !has_token(header::UPGRADE, "websocket")
    {
        return plain(
            StatusCode::BAD_REQUEST,
            "expected a WebSocket upgrade, or a POST with Content-Type: application/x-protobuf",
        );
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION).is_none_or(|v| v.as_bytes() != b"13") {
        let mut response = plain(StatusCode::UPGRADE_REQUIRED, "WebSocket version 13 is required");
        response.headers_mut().insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        return response;
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return plain(StatusCode::BAD_REQUEST, "Sec-WebSocket-Key is missing");
    };
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let Some(on_upgrade) = request.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return plain(StatusCode::UPGRADE_REQUIRED, "this connection cannot be upgraded");
    };
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => session(hyper_util::rt::TokioIo::new(upgraded), state, connection, slot).await,
            Err(error) => debug!(%error, "WebSocket upgrade failed"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(Body::empty())
        .expect("a valid response")
}

async fn plain_http(state: &OpampState, mut connection: Connection, request: Request) -> Response {
    let gzip =
        request.headers().get(header::CONTENT_ENCODING).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
    let accepts_gzip = accepts_gzip(request.headers());
    let body = match axum::body::to_bytes(request.into_body(), MAX_MESSAGE_BYTES).await {
        Ok(body) => body,
        Err(_) => {
            return plain(StatusCode::PAYLOAD_TOO_LARGE, &format!("message larger than {MAX_MESSAGE_BYTES} bytes"));
        }
    };
    let message = match codec::decode_http_body(&body, gzip) {
        Ok(message) => message,
        Err(error @ DecodeError::TooLarge { .. }) => return plain(StatusCode::PAYLOAD_TOO_LARGE, &error.to_string()),
        Err(error) => return plain(StatusCode::BAD_REQUEST, &error.to_string()),
    };
    Metrics::count(&state.metrics.opamp_messages_in);
    if let Some(adopter) = &state.adopter
        && let Ok(uid) = InstanceUid::from_wire(&message.instance_uid)
    {
        adopter.adopt(&state.registry, uid.0).await;
    }
    let targets = Arc::clone(&state.targets.borrow());
    let outcome = agent::handle(&state.registry, &targets, &mut connection, message, crate::time::now_ms());
    if outcome.too_many_new {
        Metrics::count(&state.metrics.new_instances_refused);
        let mut response = plain(StatusCode::TOO_MANY_REQUESTS, TOO_MANY_NEW);
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static(TOO_MANY_NEW_RETRY_AFTER));
        return response;
    }
    let mut body = codec::encode_http_body(&outcome.reply);
    count_sent(&state.metrics, outcome.reply.remote_config.is_some());
    let mut response = Response::builder().status(StatusCode::OK).header(header::CONTENT_TYPE, PROTOBUF);
    if accepts_gzip && body.len() >= GZIP_FROM {
        body = codec::gzip(&body);
        response = response.header(header::CONTENT_ENCODING, "gzip");
    }
    response.body(Body::from(body)).expect("a valid response")
}

/// The OpAMP URL a client used to reach us, from `Host`; secure when we terminate TLS or a
/// TLS proxy in front says so (`X-Forwarded-Proto`).
fn dialled_endpoint(headers: &HeaderMap, is_http: bool, tls: bool) -> Option<String> {
    let host = headers.get(header::HOST)?.to_str().ok()?;
    if host.is_empty() || host.contains(['/', ' ', '@']) {
        return None;
    }
    let tls = tls || headers.get("x-forwarded-proto").is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"));
    let scheme = match (is_http, tls) {
        (true, true) => "https",
        (true, false) => "http",
        (false, true) => "wss",
        (false, false) => "ws",
    };
    Some(format!("{scheme}://{host}/v1/opamp"))
}

fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers.get_all(header::ACCEPT_ENCODING).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).any(
        |coding| {
            let mut parts = coding.split(';');
            let name = parts.next().unwrap_or_default().trim();
            let refused = parts
                .any(|p| p.trim().strip_prefix("q=").is_some_and(|q| q.trim().parse::<f32>().is_ok_and(|q| q == 0.0)));
            (name.eq_ignore_ascii_case("gzip") || name == "*") && !refused
        },
    )
}

async fn read_next<R: tokio::io::AsyncRead + Unpin>(
    mut reader: FrameReader<R>,
) -> (FrameReader<R>, Result<Incoming, WsError>) {
    let message = reader.read_message().await;
    (reader, message)
}

async fn session<S>(io: S, state: OpampState, mut connection: Connection, slot: ConnectionSlot)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let session_id = state.registry.new_session_id();
    connection.transport = Transport::WebSocket;
    connection.session = Some(session_id);
    let mut targets = state.targets.clone();
    let mut seen_generation = targets.borrow_and_update().get(&*connection.fleet).map(|target| target.generation);
    // Checked once at the start too: the token may have been refused since the upgrade.
    let mut tokens = state.tokens.clone();
    tokens.mark_changed();
    let (reader, mut writer) = tokio::io::split(io);
    // The read future owns the reader and is only replaced once it completes, so a push
    // never interrupts a frame halfway.
    let frames = FrameReader::new(reader, MAX_MESSAGE_BYTES, state.assembling.clone(), MESSAGE_WITHIN);
    let mut reading = Box::pin(read_next(frames));
    let close = loop {
        // The select only says what happened; what to send is worked out without awaiting,
        // so that only its encoded bytes are held across the write. (Messages held across an
        // await would be part of every idle session's future.)
        let event = tokio::select! {
            () = state.cancel.cancelled() => Event::ShuttingDown,
            (frame_reader, received) = &mut reading => {
                reading.set(read_next(frame_reader));
                Event::Received(received)
            }
            changed = targets.changed() => match changed {
                Ok(()) => Event::Targets,
                Err(_) => Event::ShuttingDown,
            },
            changed = tokens.changed() => match changed {
                Ok(()) => Event::Tokens,
                Err(_) => Event::ShuttingDown,
            },
        };
        let step = match event {
            Event::ShuttingDown => Step::Close(Some((1001, "gitfleet is shutting down"))),
            Event::Received(Ok(Incoming::Binary(payload))) => match decode_step(&payload) {
                Ok(message) => {
                    drop(payload);
                    // Boxed: held across the await, it would otherwise be part of every
                    // session's future.
                    let message = Box::new(message);
                    if let (Some(adopter), Ok(uid)) = (&state.adopter, InstanceUid::from_wire(&message.instance_uid)) {
                        adopter.adopt(&state.registry, uid.0).await;
                    }
                    message_step(&state, &mut connection, *message)
                }
                Err(step) => step,
            },
            Event::Received(received) => received_step(received),
            Event::Targets => {
                let current = Arc::clone(&targets.borrow_and_update());
                // Another fleet's change: nothing for this instance.
                let generation = current.get(&*connection.fleet).map(|target| target.generation);
                if std::mem::replace(&mut seen_generation, generation) == generation {
                    continue;
                }
                match push_for(&state.registry, &current, &mut connection) {
                    Some(push) => Step::Send(Frame::message(&push)),
                    None => continue,
                }
            }
            Event::Tokens => {
                let refused = tokens.borrow_and_update().refusal(&connection.token_id, crate::time::now_unix());
                match refused {
                    Some(refused) => {
                        info!(fleet = %connection.fleet, token = %connection.token_id, reason = %refused, "closing a session whose install token is refused now");
                        Step::Close(Some((1008, refused.close_reason())))
                    }
                    None => continue,
                }
            }
        };
        match step {
            Step::Close(close) => break close,
            Step::Send(frame) => {
                if frame.write(&mut writer, &state.metrics).await.is_err() {
                    break None;
                }
            }
            Step::SendThenClose(frame, close) => {
                if frame.write(&mut writer, &state.metrics).await.is_err() {
                    break None;
                }
                break Some(close);
            }
        }
    };
    if let Some((code, reason)) = close {
        let _ = ws::write_frame(&mut writer, ws::CLOSE, &ws::close_payload(code, reason)).await;
    }
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut writer).await;
    if let Some(uid) = connection.uid {
        state.registry.session_ended(&uid, session_id);
    }
    drop(slot);
}

/// What woke a session.
enum Event {
    Received(Result<Incoming, WsError>),
    Targets,
    Tokens,
    ShuttingDown,
}

/// What a session does next.
enum Step {
    Send(Frame),
    /// Sends, then closes with this code and reason.
    SendThenClose(Frame, (u16, &'static str)),
    /// Closes, with a close frame if there is a code.
    Close(Option<(u16, &'static str)>),
}

/// A frame to write, and what it counts as once written.
struct Frame {
    opcode: u8,
    payload: Vec<u8>,
    /// For an OpAMP message: whether it carries a remote config.
    message: Option<bool>,
}

impl Frame {
    fn message(message: &ServerToAgent) -> Self {
        Self {
            opcode: ws::BINARY,
            payload: codec::encode_ws_message(message),
            message: Some(message.remote_config.is_some()),
        }
    }

    async fn write<W: tokio::io::AsyncWrite + Unpin>(self, writer: &mut W, metrics: &Metrics) -> std::io::Result<()> {
        ws::write_frame(writer, self.opcode, &self.payload).await?;
        if let Some(remote_config) = self.message {
            count_sent(metrics, remote_config);
        }
        Ok(())
    }
}

/// The message in a binary frame, or how to close.
fn decode_step(payload: &[u8]) -> Result<AgentToServer, Step> {
    codec::decode_ws_message(payload).map_err(|error| match error {
        DecodeError::TooLarge { .. } => Step::Close(Some((1009, "message too big"))),
        error => {
            debug!(%error, "malformed OpAMP message");
            Step::Close(Some((1007, "malformed OpAMP message")))
        }
    })
}

/// Handles a message the agent sent: the reply to write, or how to close.
fn message_step(state: &OpampState, connection: &mut Connection, message: AgentToServer) -> Step {
    Metrics::count(&state.metrics.opamp_messages_in);
    let current = Arc::clone(&state.targets.borrow());
    let outcome = agent::handle(&state.registry, &current, connection, message, crate::time::now_ms());
    if outcome.replaced {
        return Step::Close(Some((1008, "a newer connection took over this instance_uid")));
    }
    if outcome.too_many_new {
        Metrics::count(&state.metrics.new_instances_refused);
        return Step::Close(Some((1013, TOO_MANY_NEW)));
    }
    let reply = Frame::message(&outcome.reply);
    if outcome.disconnect {
        return Step::SendThenClose(reply, (1000, "goodbye"));
    }
    Step::Send(reply)
}

/// Handles what else the agent sent (the session loop handles messages): the reply to
/// write, or how to close.
fn received_step(received: Result<Incoming, WsError>) -> Step {
    match received {
        Ok(Incoming::Binary(_)) => unreachable!("the session loop handles messages"),
        Ok(Incoming::Ping(payload)) => Step::Send(Frame { opcode: ws::PONG, payload, message: None }),
        Ok(Incoming::Text) => Step::Close(Some((1003, "OpAMP uses binary messages"))),
        Ok(Incoming::Close(_)) => Step::Close(Some((1000, ""))),
        Err(WsError::TooBig(_)) => Step::Close(Some((1009, "message too big"))),
        Err(WsError::Busy) => Step::Close(Some((1013, "too many large messages arriving; try again later"))),
        Err(error @ WsError::Unfinished(_)) => {
            debug!(%error, "closing a connection whose message stalled");
            Step::Close(Some((1008, "message not completed in time")))
        }
        Err(WsError::Protocol(what)) => {
            debug!(error = what, "WebSocket protocol violation");
            Step::Close(Some((1002, "protocol error")))
        }
        Err(WsError::Io(_)) => Step::Close(None),
    }
}

/// What to push to this connection's instance after its fleet's target changed: the
/// assigned config, and the fleet's new token when it was rotated.
fn push_for(registry: &Registry, targets: &Targets, connection: &mut Connection) -> Option<ServerToAgent> {
    let uid = connection.uid?;
    let now = crate::time::now_ms();
    let (remote_config, capabilities, first_seen_ms) = {
        let mut shard = registry.shard(&uid);
        let record = shard.get_mut(&uid)?;
        if record.session != connection.session {
            // Another connection speaks for this instance now.
            return None;
        }
        record.sync(targets.get(&*record.fleet), now);
        (agent::remote_config_for(record, targets, now), record.config.capabilities, record.first_seen_ms)
    };
    let connection_settings =
        agent::offer_for(connection, capabilities, first_seen_ms, targets.get(&*connection.fleet));
    if remote_config.is_none() && connection_settings.is_none() {
        return None;
    }
    Some(ServerToAgent {
        instance_uid: connection.wire_uid.clone(),
        remote_config,
        connection_settings,
        ..Default::default()
    })
}

/// The other replicas' instances of `fleets`, for the rollouts to look at; none on a store
/// only this process uses. `None`, with a warning, when the store cannot be read.
async fn read_elsewhere(
    registry: &Arc<Registry>,
    store: &Arc<dyn crate::store::Store>,
    replica: &str,
    fleets: Vec<String>,
) -> Option<std::collections::HashMap<String, Vec<crate::opamp::registry::InstanceRecord>>> {
    if fleets.is_empty() || !store.shared() {
        return Some(Default::default());
    }
    let (registry, store, replica) = (Arc::clone(registry), Arc::clone(store), replica.to_owned());
    let read = tokio::task::spawn_blocking(move || {
        let mut elsewhere = std::collections::HashMap::new();
        for fleet in fleets {
            let records: Vec<_> = store
                .instances_held_elsewhere(&replica, Some(&fleet))?
                .into_iter()
                .filter(|instance| !registry.knows(&InstanceUid(instance.uid)))
                .map(|instance| registry.elsewhere(instance, Vec::new()))
                .collect();
            elsewhere.insert(fleet, records);
        }
        Ok::<_, crate::store::StoreError>(elsewhere)
    })
    .await
    .expect("reading does not panic");
    read.map_err(
        |store_error| warn!(error = %store_error, "cannot read the other replicas' instances for the rollouts"),
    )
    .ok()
}

/// The rollouts in the store; `book` when they cannot be read.
async fn read_rollouts(store: &Arc<dyn crate::store::Store>, book: RolloutBook) -> RolloutBook {
    let reading = Arc::clone(store);
    match tokio::task::spawn_blocking(move || RolloutBook::load(&*reading)).await.expect("the store does not panic") {
        Ok(read) => read,
        Err(store_error) => {
            tracing::warn!(error = %store_error, "cannot read the rollouts the leader stored; keeping those read before");
            book
        }
    }
}

/// Keeps `targets` in step with the desired state and each fleet's rollout, and the registry
/// in step with both the targets and the clock (staleness), recording status changes in
/// instance histories. It owns the rollouts: it starts them when the desired state changes,
/// moves them on as instances settle (every `ROLLOUT_TICK` while one runs), and hands out a
/// rollout only once the store has it.
#[allow(clippy::too_many_arguments)]
pub async fn follow_targets(
    mut view: watch::Receiver<Arc<View>>,
    targets: watch::Sender<Arc<Targets>>,
    tokens: watch::Sender<Arc<TokenIndex>>,
    public_endpoint: Option<String>,
    install_ca: Option<Arc<str>>,
    registry: Arc<Registry>,
    store: Arc<dyn crate::store::Store>,
    (mut rollouts, mut leading): (RolloutBook, watch::Receiver<bool>),
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rollout_tick = tokio::time::interval(ROLLOUT_TICK);
    rollout_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_refusal = None;
    let (mut looked_at, mut view_changed) = (u64::MAX, true);
    let mut role_settled = false;
    loop {
        // Which records to bring up to date once the arm below has run.
        let mut sync = Sync::All;
        tokio::select! {
            () = cancel.cancelled() => break,
            changed = view.changed() => {
                if changed.is_err() {
                    break;
                }
                let index = Arc::clone(&view.borrow().tokens);
                if !Arc::ptr_eq(&index, &tokens.borrow()) {
                    next_refusal = index.next_refusal_after(crate::time::now_unix());
                    tokens.send_replace(index);
                }
                let current = Arc::clone(&view.borrow_and_update());
                if *leading.borrow() {
                    if let Some(desired) = &current.desired {
                        let wanted = rollouts.wanting_facts(desired);
                        // Without the other replicas' instances a new rollout would size its
                        // steps by this replica's alone: it starts once the store answers.
                        let elsewhere = read_elsewhere(&registry, &store, &current.replica, wanted).await;
                        if let Some(elsewhere) = &elsewhere {
                            let instances = rollouts::Instances { registry: &registry, elsewhere };
                            rollouts.follow(desired, &instances, crate::time::now_ms());
                        }
                    }
                    rollouts.save(&store).await;
                } else {
                    // The leader drives rollouts; a follower hands out what it stored.
                    rollouts = read_rollouts(&store, rollouts).await;
                }
                view_changed = true;
                // Records follow the targets alone: a view change that leaves them as they
                // were (a fetch counted, a problem) leaves the records to the clock's tick.
                sync = if publish(&targets, &current, &rollouts, public_endpoint.as_deref(), install_ca.as_ref()) {
                    Sync::Unattended
                } else {
                    Sync::None
                };
            }
            changed = leading.changed(), if !role_settled => {
                if changed.is_err() {
                    // The role no longer changes (the server is stopping).
                    role_settled = true;
                    continue;
                }
                // Leading now: the rollouts as the last leader stored them.
                leading.borrow_and_update();
                rollouts = read_rollouts(&store, rollouts).await;
                sync = Sync::None;
            }
            _ = rollout_tick.tick(), if rollouts.any_active() && *leading.borrow() => {
                // Only when an instance's status or health moved, a bake may be over, or
                // the fleet file changed (a release): a quiet fleet costs nothing.
                let current = Arc::clone(&view.borrow());
                let Some(desired) = &current.desired else { continue };
                let changes = crate::opamp::registry::outcome_changes();
                if changes == looked_at && !view_changed && !rollouts.bake_over(desired, crate::time::now_ms()) {
                    continue;
                }
                (looked_at, view_changed) = (changes, false);
                let wanted = rollouts.wanting_facts(desired);
                // Judged on part of the fleet, a step could look settled when it is not.
                // Looked at again on the next change.
                let Some(elsewhere) = read_elsewhere(&registry, &store, &current.replica, wanted).await else {
                    continue;
                };
                let instances = rollouts::Instances { registry: &registry, elsewhere: &elsewhere };
                rollouts.advance(desired, &instances, crate::time::now_ms());
                // Only a stored change is handed out: then every instance it moves syncs.
                let published = rollouts.save(&store).await
                    && publish(&targets, &current, &rollouts, public_endpoint.as_deref(), install_ca.as_ref());
                sync = if published { Sync::Unattended } else { Sync::None };
            }
            _ = tick.tick() => {
                // A token reached its expiry or the end of its grace: wake the sessions.
                let now = crate::time::now_unix();
                if next_refusal.is_some_and(|at| now >= at) {
                    tokens.send_modify(|index| next_refusal = index.next_refusal_after(now));
                }
            }
        }
        // Until the repository has been read, no target is known: leave records alone
        // rather than unassigning every restored instance.
        if sync == Sync::None || view.borrow().desired.is_none() {
            continue;
        }
        let current = Arc::clone(&targets.borrow());
        let registry = Arc::clone(&registry);
        let synced = tokio::task::spawn_blocking(move || match sync {
            Sync::Unattended => registry.sync_unattended(&current, crate::time::now_ms()),
            _ => registry.sync_all(&current, crate::time::now_ms()),
        })
        .await;
        if synced.is_err() {
            warn!("syncing the registry panicked");
        }
    }
}

/// Which records `follow_targets` brings up to date after an event.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sync {
    None,
    /// Those without a live WebSocket session: new targets were published, and each session
    /// syncs its own record as it pushes.
    Unattended,
    /// Every record: the clock moved (staleness).
    All,
}

/// How often running rollouts may look at their instances (when something moved): the most a
/// step that settled (or baked) waits before the next one starts.
const ROLLOUT_TICK: std::time::Duration = std::time::Duration::from_millis(25);

/// Publishes the targets of `view` and the stored rollouts when they changed; returns whether
/// they did.
fn publish(
    targets: &watch::Sender<Arc<Targets>>,
    view: &View,
    rollouts: &RolloutBook,
    public_endpoint: Option<&str>,
    install_ca: Option<&Arc<str>>,
) -> bool {
    let mut next = targets_of(view, rollouts.stored(), public_endpoint, install_ca);
    {
        // What did not change keeps its generation and its `Arc`s (later comparisons are
        // then by pointer); what changed gets the next generation.
        let current = targets.borrow();
        let reuse = |new: &mut Option<Arc<ServedVersion>>, old: &Option<Arc<ServedVersion>>| {
            if let (Some(new_version), Some(old_version)) = (new.as_ref(), old) {
                if new_version == old_version {
                    *new = Some(Arc::clone(old_version));
                }
            }
        };
        for (fleet, target) in &mut next {
            let Some(old) = current.get(fleet) else { continue };
            reuse(&mut target.version, &old.version);
            reuse(&mut target.before, &old.before);
            target.generation = if *target == *old { old.generation } else { old.generation + 1 };
        }
    }
    let next = Arc::new(next);
    let modified = targets.send_if_modified(|current| {
        if **current == *next {
            return false;
        }
        *current = Arc::clone(&next);
        true
    });
    if modified {
        debug!(fleets = next.len(), "fleet targets changed");
    }
    modified
}

/// What each fleet's instances should run, from the desired state. `public_endpoint` is
/// the OpAMP URL from `--public-url`, offered when a fleet names no `[install].endpoint`;
/// `install_ca` (`--install-ca-file`) goes with offers of a `wss://` or `https://` endpoint.
pub fn targets_of(
    view: &View,
    rollouts: &BTreeMap<String, Arc<Rollout>>,
    public_endpoint: Option<&str>,
    install_ca: Option<&Arc<str>>,
) -> Targets {
    let Some(desired) = &view.desired else { return Targets::new() };
    desired
        .fleets
        .values()
        .map(|fleet| {
            let rollout = rollouts.get(fleet.name()).filter(|rollout| {
                fleet.assignment.as_ref().is_some_and(|v| rollout.to.hash == hex::encode(v.config_hash))
            });
            let before = rollout
                .filter(|rollout| {
                    !matches!(rollout.state, crate::rollout::State::Complete | crate::rollout::State::Reverted)
                })
                .and_then(|rollout| rollouts::version_of(desired, &rollout.from.as_ref()?.tag));
            let target = crate::opamp::registry::FleetTarget {
                version: fleet.assignment.as_deref().map(served),
                rollout: rollout.cloned(),
                before: before.map(|version| served(version)),
                stale_after_ms: i64::try_from(fleet.spec.health.stale_after.as_millis()).unwrap_or(i64::MAX),
                current_token: view
                    .fleet_tokens
                    .get(fleet.name())
                    .and_then(|tokens| tokens.current())
                    .map(|current| Arc::from(current.token.id.as_str())),
                credentials: view.fleet_tokens.get(fleet.name()).and_then(|tokens| {
                    let current = tokens.current()?;
                    let text = tokens.text.as_ref()?;
                    Some(Arc::new(crate::opamp::registry::Credentials {
                        token_id: Arc::from(current.token.id.as_str()),
                        issued_at: current.token.issued_at,
                        authorization: format!("Bearer {}", text.expose()),
                        endpoint: fleet.spec.install.endpoint.clone().or_else(|| public_endpoint.map(str::to_owned)),
                        ca: install_ca.cloned(),
                    }))
                }),
                generation: 0,
            };
            (fleet.name().to_owned(), target)
        })
        .collect()
}

/// A published version as it goes out to collectors.
fn served(version: &crate::repo::desired::Version) -> Arc<ServedVersion> {
    Arc::new(ServedVersion {
        assignment: crate::instance::Assignment { hash: version.config_hash.to_vec(), tag: version.tag.clone() },
        content_type: version.content_type.clone(),
        body: Arc::clone(&version.body),
        declares_pipelines: version.content_type.contains("yaml")
            && std::str::from_utf8(&version.body)
                .ok()
                .and_then(crate::repo::lint::pipeline_count)
                .is_some_and(|count| count > 0),
    })
}
