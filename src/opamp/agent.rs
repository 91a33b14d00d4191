//! One `AgentToServer` in, one `ServerToAgent` out: the protocol logic shared by the
//! WebSocket and plain-HTTP transports. Synchronous: it runs under a registry shard lock.
//!
//! - every reply echoes the agent's `instance_uid`; the first reply on a connection carries
//!   the server capabilities;
//! - an unknown instance, or a `sequence_num` that is not the previous one plus one, gets
//!   `ReportFullState` when the message lacks what its capabilities promise;
//! - an invalid id or a requested id (`RequestInstanceUid`) gets a new one through
//!   `AgentIdentification`. An id that another live WebSocket speaks for is taken over by
//!   the newer connection (the older one is most likely dead without the server knowing,
//!   as behind a load balancer's idle timeout) and the older one is told to go; only when
//!   the same id is taken over again and again (two agents sharing it, as cloned VMs do)
//!   does the newcomer get a new id;
//! - the fleet's assigned config goes out when `instance::ConfigState` says so.

use std::sync::Arc;

use crate::instance::Reported;
use crate::opamp::codec::InstanceUid;
use crate::opamp::proto::{
    self, AgentConfigFile, AgentConfigMap, AgentIdentification, AgentRemoteConfig, AgentToServer, ServerToAgent,
};
use crate::opamp::registry::{
    ComponentHealth, Description, EffectiveConfig, Health, InstanceRecord, Registry, Targets, Transport,
};

/// AcceptsStatus | OffersRemoteConfig | AcceptsEffectiveConfig | OffersConnectionSettings.
pub const SERVER_CAPABILITIES: u64 = 0x1 | 0x2 | 0x4 | 0x20;
const ACCEPTS_OPAMP_CONNECTION_SETTINGS: u64 = 0x100;
/// The heartbeat interval put in connection-settings offers: the Supervisor takes an
/// omitted one as 0, which turns heartbeats off (opamp.md §4.8), so it is always sent.
pub const OFFERED_HEARTBEAT_SECONDS: u64 = 30;
const REPORT_FULL_STATE: u64 = 0x1;
const REPORT_AVAILABLE_COMPONENTS: u64 = 0x2;
const REQUEST_INSTANCE_UID: u64 = 0x1;
const REPORTS_EFFECTIVE_CONFIG: u64 = 0x4;
const REPORTS_HEALTH: u64 = 0x800;
const REPORTS_REMOTE_CONFIG: u64 = 0x1000;
/// Takeovers of one id tolerated within `TAKEOVER_WINDOW_MS` before it counts as shared.
const MAX_TAKEOVERS: u32 = 2;
const TAKEOVER_WINDOW_MS: i64 = 60_000;

/// What one connection (a WebSocket, or one HTTP request) knows about itself.
#[derive(Clone, Debug)]
pub struct Connection {
    pub fleet: Arc<str>,
    pub token_id: Arc<str>,
    pub transport: Transport,
    /// The WebSocket session id; `None` for HTTP.
    pub session: Option<u64>,
    /// True until the first reply is sent.
    pub first_reply: bool,
    /// The instance this connection speaks for, once known.
    pub uid: Option<InstanceUid>,
    /// The `instance_uid` bytes to put in pushes: what the agent sent, or its new id.
    pub wire_uid: Vec<u8>,
    /// The OpAMP endpoint this connection dialled (from its `Host`), offered when the
    /// fleet names none.
    pub dialled: Option<Arc<str>>,
    /// The token id last offered on this connection, so each rotation is offered once.
    pub offered: Option<Arc<str>>,
}

/// The reply, and what the transport must do besides sending it.
#[derive(Debug)]
pub struct Outcome {
    pub reply: ServerToAgent,
    /// The agent said goodbye (`agent_disconnect`).
    pub disconnect: bool,
    /// A newer connection took over this connection's instance id: close this one.
    pub replaced: bool,
    /// The message would create an instance its token may not create now
    /// (`NewInstanceLimit`): nothing was kept; refuse it with a "try again later".
    pub too_many_new: bool,
    /// The instance the message counts for (its new id, if it was given one).
    pub uid: InstanceUid,
}

pub fn handle(
    registry: &Registry,
    targets: &Targets,
    connection: &mut Connection,
    message: AgentToServer,
    now_ms: i64,
) -> Outcome {
    let wire_uid = message.instance_uid.clone();
    let spoke_for = connection.uid;
    let parsed = InstanceUid::from_wire(&wire_uid).ok();
    let mut new_uid = None;
    let uid = match parsed {
        Some(uid) if message.flags & REQUEST_INSTANCE_UID == 0 && !shared(registry, &uid, connection, now_ms) => uid,
        // Invalid, requested, or shared with another live agent: a fresh id.
        _ => {
            let fresh = fresh_uid();
            new_uid = Some(fresh);
            fresh
        }
    };
    connection.uid = Some(uid);
    connection.wire_uid = match new_uid {
        Some(fresh) => fresh.0.to_vec(),
        None => wire_uid.clone(),
    };
    let target = targets.get(&*connection.fleet);

    let mut shard = registry.shard(&uid);
    let taken_over = connection.session.is_some()
        && shard.get(&uid).and_then(|r| r.session).is_some_and(|holder| Some(holder) != connection.session);
    if taken_over && spoke_for == Some(uid) && new_uid.is_none() {
        // This connection was replaced by a newer one for the same id.
        drop(shard);
        let reply = ServerToAgent { instance_uid: wire_uid, ..Default::default() };
        return Outcome { reply, disconnect: false, replaced: true, too_many_new: false, uid };
    }
    // `None` for an instance gitfleet does not know: its token's allowance decides.
    let heard_before = shard.get(&uid).map(|r| r.sequence_num.is_some());
    if heard_before.is_none() && !registry.admit_new_instance(&connection.token_id, now_ms) {
        drop(shard);
        let reply = ServerToAgent { instance_uid: wire_uid, ..Default::default() };
        return Outcome { reply, disconnect: false, replaced: false, too_many_new: true, uid };
    }
    let known = heard_before == Some(true);
    let record = shard.entry(uid).or_insert_with(|| {
        InstanceRecord::new(
            uid,
            Arc::clone(&connection.fleet),
            Arc::clone(&connection.token_id),
            message.capabilities,
            now_ms,
        )
    });
    if record.fleet != connection.fleet || record.token_id != connection.token_id {
        // The collector now uses another token, possibly another fleet's: it moved.
        record.fleet = Arc::clone(&connection.fleet);
        record.token_id = Arc::clone(&connection.token_id);
        record.touch();
    }
    let gap = known && record.sequence_num.map(|last| last.wrapping_add(1)) != Some(message.sequence_num);
    // Sequence numbers start over with each agent process (a repeat is an HTTP retry).
    let started_over = known && record.sequence_num.is_some_and(|last| message.sequence_num < last);
    let capabilities = message.capabilities;
    let lacks_state = (capabilities & REPORTS_EFFECTIVE_CONFIG != 0 && message.effective_config.is_none())
        || (capabilities & REPORTS_HEALTH != 0 && message.health.is_none())
        || (capabilities & REPORTS_REMOTE_CONFIG != 0 && message.remote_config_status.is_none())
        || (message.agent_description.is_none() && record.description.is_none());
    let full_state = (!known || gap) && lacks_state;

    let reports_something = message.agent_description.is_some()
        || message.health.is_some()
        || message.effective_config.is_some()
        || message.remote_config_status.is_some()
        || record.config.capabilities != message.capabilities
        || record.transport != Some(connection.transport);
    if reports_something {
        record.touch();
    }
    if let Some(description) = &message.agent_description {
        record.description = Some(Box::new(describe(description)));
    }
    if let Some(health) = &message.health {
        if record.health.as_ref().map(|h| h.healthy) != Some(health.healthy) {
            crate::opamp::registry::note_outcome_change();
        }
        record.health = Some(Box::new(health_summary(health)));
    }
    if let Some(effective) = &message.effective_config {
        record.effective_config = effective_config(effective).map(Box::new);
        record.runs_pipelines =
            record.effective_config.as_ref().and_then(|config| registry.runs_pipelines(&config.body));
    }
    // The build's components: a whole list is kept by its hash; a hash alone is looked up,
    // and asked for in full when gitfleet does not know it (opamp.md §3.11).
    let mut ask_components = false;
    if let Some(available) = &message.available_components
        && !available.hash.is_empty()
        && record.components.as_ref().is_none_or(|known| known.hash != available.hash)
    {
        let known = if available.components.is_empty() {
            registry.components(&available.hash)
        } else {
            registry.learn_components(available_components(available))
        };
        ask_components = known.is_none() && available.components.is_empty();
        if known.is_some() {
            record.components = known;
            record.touch();
        }
    }
    let report = message.remote_config_status.as_ref().map(|status| {
        (
            status.last_remote_config_hash.clone(),
            Reported::from_wire(status.status),
            clip(&status.error_message, ERROR_MAX),
        )
    });
    record.sync(target, now_ms);
    if started_over {
        record.config.restarted();
    }
    let stale_after = target.map_or(i64::MAX, |t| t.stale_after_ms);
    let changes = record.config.heard(capabilities, report, now_ms, stale_after);
    record.record(changes, now_ms);
    let declares_pipelines = target
        .and_then(|t| t.version_with(&record.config.assigned.as_ref()?.hash))
        .is_some_and(|version| version.declares_pipelines);
    if declares_pipelines && record.runs_pipelines == Some(false) {
        let changes = record.config.applied_but_idle(now_ms, stale_after);
        record.record(changes, now_ms);
    }
    record.sequence_num = Some(message.sequence_num);

    let disconnect = message.agent_disconnect.is_some();
    if disconnect {
        if record.session == connection.session {
            record.session = None;
        }
    } else {
        record.transport = Some(connection.transport);
        if connection.session.is_some() {
            record.session = connection.session;
        }
    }

    let remote_config = if disconnect { None } else { remote_config_for(record, targets, now_ms) };
    let connection_settings =
        if disconnect { None } else { offer_for(connection, capabilities, record.first_seen_ms, target) };
    drop(shard);

    let reply = ServerToAgent {
        instance_uid: wire_uid,
        flags: if full_state { REPORT_FULL_STATE } else { 0 }
            | if ask_components { REPORT_AVAILABLE_COMPONENTS } else { 0 },
        capabilities: if std::mem::take(&mut connection.first_reply) { SERVER_CAPABILITIES } else { 0 },
        remote_config,
        agent_identification: new_uid.map(|uid| AgentIdentification { new_instance_uid: uid.0.to_vec() }),
        connection_settings,
        ..Default::default()
    };
    Outcome { reply, disconnect, replaced: false, too_many_new: false, uid }
}

/// The assigned config if it should go to this instance now; marks it served.
pub fn remote_config_for(record: &mut InstanceRecord, targets: &Targets, now_ms: i64) -> Option<AgentRemoteConfig> {
    let target = targets.get(&*record.fleet)?;
    let assignment = record.config.config_to_push()?.clone();
    let version = target.version_with(&assignment.hash)?;
    let changes = record.config.served(assignment.hash.clone(), now_ms, target.stale_after_ms);
    record.record(changes, now_ms);
    let file = AgentConfigFile { body: version.body.to_vec(), content_type: version.content_type.clone() };
    Some(AgentRemoteConfig {
        config: Some(AgentConfigMap { config_map: [(String::new(), file)].into_iter().collect() }),
        config_hash: assignment.hash,
    })
}

/// The fleet's current token as an OpAMP connection-settings offer, when this connection
/// still uses an older token, its agent accepts such offers, and it has not been offered
/// this token yet. The offer carries everything the Supervisor rebuilds its connection
/// from: the endpoint, the full header set and the heartbeat interval (opamp.md §4.8).
///
/// For a `wss://` or `https://` endpoint it always carries a `certificate`, with the
/// private CA when the server has one: the Supervisor takes an offer without one as
/// "skip verifying the server" and drops its configured `tls`, so a rotation would
/// otherwise leave every collector open to a man in the middle.
pub fn offer_for(
    connection: &mut Connection,
    capabilities: u64,
    first_seen_ms: i64,
    target: Option<&crate::opamp::registry::FleetTarget>,
) -> Option<proto::ConnectionSettingsOffers> {
    let credentials = target?.credentials.as_ref()?;
    // Only an instance that was there before the rotation (to the second) is offered the
    // new token: whoever holds a leaked old one and connects since gets nothing.
    let known_before = first_seen_ms.div_euclid(1000) <= credentials.issued_at;
    if capabilities & ACCEPTS_OPAMP_CONNECTION_SETTINGS == 0
        || !known_before
        || connection.token_id == credentials.token_id
        || connection.offered.as_ref() == Some(&credentials.token_id)
    {
        return None;
    }
    let endpoint = credentials.endpoint.as_deref().or(connection.dialled.as_deref())?.to_owned();
    connection.offered = Some(Arc::clone(&credentials.token_id));
    let header = proto::Header { key: "Authorization".to_owned(), value: credentials.authorization.clone() };
    let secure = endpoint.starts_with("wss://") || endpoint.starts_with("https://");
    let certificate = secure.then(|| proto::TlsCertificate {
        ca_cert: credentials.ca.as_deref().unwrap_or_default().as_bytes().to_vec(),
        ..Default::default()
    });
    let hash = {
        use sha2::{Digest, Sha256};
        let mut hasher = Sha256::new();
        let ca = certificate.as_ref().map(|c| c.ca_cert.as_slice()).unwrap_or_default();
        for part in [endpoint.as_bytes(), header.key.as_bytes(), header.value.as_bytes(), ca] {
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part);
        }
        hasher.update([u8::from(secure)]);
        hasher.update(OFFERED_HEARTBEAT_SECONDS.to_be_bytes());
        hasher.finalize().to_vec()
    };
    Some(proto::ConnectionSettingsOffers {
        hash,
        opamp: Some(proto::OpAmpConnectionSettings {
            destination_endpoint: endpoint,
            headers: Some(proto::Headers { headers: vec![header] }),
            certificate,
            heartbeat_interval_seconds: OFFERED_HEARTBEAT_SECONDS,
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// Whether `uid` is shared with another live agent: another WebSocket speaks for it and it
/// has been taken over more than `MAX_TAKEOVERS` times within `TAKEOVER_WINDOW_MS`.
fn shared(registry: &Registry, uid: &InstanceUid, connection: &Connection, now_ms: i64) -> bool {
    let Some(session) = connection.session else { return false };
    if connection.uid == Some(*uid) {
        return false;
    }
    let mut shard = registry.shard(uid);
    let Some(record) = shard.get_mut(uid) else { return false };
    if record.session.is_none_or(|holder| holder == session) {
        return false;
    }
    if now_ms - record.takeovers_since_ms > TAKEOVER_WINDOW_MS {
        record.takeovers_since_ms = now_ms;
        record.takeovers = 0;
    }
    record.takeovers += 1;
    record.takeovers > MAX_TAKEOVERS
}

/// A random (version 4) UUID.
pub fn fresh_uid() -> InstanceUid {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the operating system's random source works");
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    InstanceUid(bytes)
}

fn value_text(value: Option<&proto::AnyValue>) -> String {
    use proto::any_value::Value;
    match value.and_then(|v| v.value.as_ref()) {
        None => String::new(),
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(Value::BytesValue(b)) => hex::encode(b),
        Some(Value::ArrayValue(array)) => {
            let items: Vec<String> = array.values.iter().map(|v| value_text(Some(v))).collect();
            format!("[{}]", items.join(", "))
        }
        Some(Value::KvlistValue(list)) => {
            let items: Vec<String> =
                list.values.iter().map(|kv| format!("{}={}", kv.key, value_text(kv.value.as_ref()))).collect();
            format!("{{{}}}", items.join(", "))
        }
    }
}

/// What gitfleet keeps of what an agent reports, at most: a message may be 8 MiB, and every
/// field is kept in memory, in the store and in API answers. Longer text is cut, with a note
/// of how much was left out.
pub(crate) const ATTRIBUTES_KEPT: usize = 64;
pub(crate) const KEY_MAX: usize = 256;
pub(crate) const VALUE_MAX: usize = 1024;
pub(crate) const STATUS_MAX: usize = 1024;
pub(crate) const ERROR_MAX: usize = 4096;
pub(crate) const COMPONENTS_KEPT: usize = 256;
pub(crate) const EFFECTIVE_CONFIG_MAX: usize = 256 * 1024;

/// `text` if it is at most `max` bytes, else its first bytes (on a character boundary) and
/// a note of what was cut.
pub fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let end = (0..=max).rev().find(|&index| text.is_char_boundary(index)).unwrap_or(0);
    format!("{}… [{} more bytes not kept]", &text[..end], text.len() - end)
}

fn describe(description: &proto::AgentDescription) -> Description {
    let pairs = |list: &[proto::KeyValue]| {
        let mut pairs: Vec<(String, String)> = list
            .iter()
            .take(ATTRIBUTES_KEPT)
            .map(|kv| (clip(&kv.key, KEY_MAX), clip(&value_text(kv.value.as_ref()), VALUE_MAX)))
            .collect();
        if list.len() > ATTRIBUTES_KEPT {
            pairs.push(("…".to_owned(), format!("{} more attributes not kept", list.len() - ATTRIBUTES_KEPT)));
        }
        pairs
    };
    let identifying = pairs(&description.identifying_attributes);
    let non_identifying = pairs(&description.non_identifying_attributes);
    let find = |key: &str| identifying.iter().chain(&non_identifying).find(|(k, _)| k == key).map(|(_, v)| v.clone());
    Description {
        host: find("host.name"),
        os: find("os.type"),
        os_description: find("os.description"),
        arch: find("host.arch"),
        agent_name: find("service.name"),
        agent_version: find("service.version"),
        identifying,
        non_identifying,
    }
}

fn health_summary(health: &proto::ComponentHealth) -> Health {
    let mut components = Vec::new();
    flatten_components("", &health.component_health_map, &mut components);
    Health {
        healthy: health.healthy,
        status: clip(&health.status, STATUS_MAX),
        last_error: clip(&health.last_error, ERROR_MAX),
        start_time_unix_nano: health.start_time_unix_nano,
        components,
    }
}

fn flatten_components(
    prefix: &str,
    map: &std::collections::HashMap<String, proto::ComponentHealth>,
    out: &mut Vec<ComponentHealth>,
) {
    let mut names: Vec<&String> = map.keys().collect();
    names.sort();
    for name in names {
        if out.len() >= COMPONENTS_KEPT {
            return;
        }
        let component = &map[name];
        let path = clip(&if prefix.is_empty() { name.clone() } else { format!("{prefix}/{name}") }, KEY_MAX);
        out.push(ComponentHealth {
            name: path.clone(),
            healthy: component.healthy,
            status: clip(&component.status, STATUS_MAX),
            last_error: clip(&component.last_error, ERROR_MAX),
        });
        flatten_components(&path, &component.component_health_map, out);
    }
}

/// The text kept of one build's component list at most. The real `otelcol-contrib` list
/// is about 35 KB; an agent that sends more (its message may be megabytes) is cut, so that
/// the builds gitfleet remembers stay small however many an agent invents.
const COMPONENTS_TEXT_KEPT: usize = 128 * 1024;
/// A kind, name or description longer than this is cut.
const COMPONENT_TEXT_MAX: usize = 512;

/// A component list as gitfleet keeps it: kind → name → its metadata as text (the
/// collector's `code.namespace`, its Go module and version), in sorted order, within
/// `COMPONENTS_TEXT_KEPT`.
fn available_components(available: &proto::AvailableComponents) -> crate::opamp::registry::AvailableComponents {
    let cut = |text: &str| text.chars().take(COMPONENT_TEXT_MAX).collect::<String>();
    let mut budget = COMPONENTS_TEXT_KEPT;
    let mut kinds = std::collections::BTreeMap::new();
    let mut sorted: Vec<_> = available.components.iter().collect();
    sorted.sort_by_key(|(kind, _)| kind.as_str());
    for (kind, details) in sorted {
        let mut names = std::collections::BTreeMap::new();
        let mut components: Vec<_> = details.sub_component_map.iter().collect();
        components.sort_by_key(|(name, _)| name.as_str());
        for (name, component) in components {
            let about = component.metadata.iter().find(|kv| kv.key == "code.namespace").map_or_else(
                || {
                    let pairs: Vec<String> = component
                        .metadata
                        .iter()
                        .map(|kv| format!("{}={}", kv.key, value_text(kv.value.as_ref())))
                        .collect();
                    pairs.join(", ")
                },
                |kv| value_text(kv.value.as_ref()),
            );
            let (name, about) = (cut(name), cut(&about));
            let Some(left) = budget.checked_sub(name.len() + about.len()) else { break };
            budget = left;
            names.insert(name, about);
        }
        kinds.insert(cut(kind), names);
    }
    crate::opamp::registry::AvailableComponents { hash: available.hash.clone(), kinds }
}

fn effective_config(effective: &proto::EffectiveConfig) -> Option<EffectiveConfig> {
    let map = &effective.config_map.as_ref()?.config_map;
    // The supervisor reports under "": prefer it, else the first key.
    let (_, file) = map.get_key_value("").or_else(|| map.iter().min_by_key(|(key, _)| key.as_str()))?;
    Some(EffectiveConfig {
        content_type: clip(&file.content_type, KEY_MAX),
        body: clip(&String::from_utf8_lossy(&file.body), EFFECTIVE_CONFIG_MAX),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::{Assignment, Change, Status};
    use crate::opamp::proto::{AgentDescription, AgentDisconnect, AnyValue, KeyValue, RemoteConfigStatus, any_value};
    use crate::opamp::registry::{FleetTarget, ServedVersion};

    const SUPERVISOR: u64 = 0x3847;
    const UID: [u8; 16] = [0x11; 16];

    fn targets(hash: u8) -> Targets {
        let target = FleetTarget {
            version: Some(Arc::new(ServedVersion {
                assignment: Assignment { hash: vec![hash; 32], tag: format!("gateway/v{hash}") },
                content_type: "text/yaml".into(),
                body: Arc::from(&b"receivers: {}"[..]),
                declares_pipelines: true,
            })),
            rollout: None,
            before: None,
            stale_after_ms: 120_000,
            current_token: Some(Arc::from("tk_00000001")),
            credentials: None,
            generation: 0,
        };
        [("prod".to_owned(), target)].into_iter().collect()
    }

    fn connection(session: Option<u64>) -> Connection {
        Connection {
            fleet: Arc::from("prod"),
            token_id: Arc::from("tk_00000001"),
            transport: if session.is_some() { Transport::WebSocket } else { Transport::Http },
            session,
            first_reply: true,
            uid: None,
            wire_uid: Vec::new(),
            dialled: Some(Arc::from("ws://gitfleet.test:4320/v1/opamp")),
            offered: None,
        }
    }

    fn rotated(targets: &mut Targets, endpoint: Option<&str>) {
        let target = targets.get_mut("prod").expect("prod");
        target.current_token = Some(Arc::from("tk_00000002"));
        target.credentials = Some(Arc::new(crate::opamp::registry::Credentials {
            token_id: Arc::from("tk_00000002"),
            issued_at: 100,
            authorization: "Bearer tk_00000002.secret".into(),
            endpoint: endpoint.map(str::to_owned),
            ca: Some(Arc::from("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")),
        }));
    }

    fn full_state(seq: u64) -> AgentToServer {
        AgentToServer {
            instance_uid: UID.to_vec(),
            sequence_num: seq,
            capabilities: SUPERVISOR,
            agent_description: Some(AgentDescription {
                identifying_attributes: vec![KeyValue {
                    key: "service.name".into(),
                    value: Some(AnyValue { value: Some(any_value::Value::StringValue("otelcol-contrib".into())) }),
                }],
                non_identifying_attributes: vec![KeyValue {
                    key: "host.name".into(),
                    value: Some(AnyValue { value: Some(any_value::Value::StringValue("gw-1".into())) }),
                }],
            }),
            health: Some(proto::ComponentHealth { healthy: true, ..Default::default() }),
            effective_config: Some(proto::EffectiveConfig { config_map: Some(AgentConfigMap::default()) }),
            remote_config_status: Some(RemoteConfigStatus::default()),
            ..Default::default()
        }
    }

    fn heartbeat(seq: u64) -> AgentToServer {
        AgentToServer { instance_uid: UID.to_vec(), sequence_num: seq, capabilities: SUPERVISOR, ..Default::default() }
    }

    fn status(seq: u64, hash: u8, status: i32, error: &str) -> AgentToServer {
        AgentToServer {
            remote_config_status: Some(RemoteConfigStatus {
                last_remote_config_hash: vec![hash; 32],
                status,
                error_message: error.into(),
            }),
            ..heartbeat(seq)
        }
    }

    #[test]
    fn what_an_agent_reports_is_kept_within_bounds() {
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip("ééé", 3), "é… [4 more bytes not kept]", "cut on a character boundary");

        let huge = "h".repeat(7 * 1024 * 1024);
        let text = |key: &str, value: &str| KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.into())) }),
        };
        let mut attributes = vec![text("host.name", &huge)];
        attributes.extend((0..100).map(|n| text(&format!("label.{n}"), "x")));
        let components = (0..1000)
            .map(|n| {
                let last_error = if n < 3 { huge.clone() } else { String::new() };
                (format!("receiver/{n}"), proto::ComponentHealth { last_error, ..Default::default() })
            })
            .collect();
        let config = AgentConfigFile { body: vec![b'a'; 2 * 1024 * 1024], content_type: "text/yaml".into() };
        let message = AgentToServer {
            agent_description: Some(AgentDescription {
                identifying_attributes: Vec::new(),
                non_identifying_attributes: attributes,
            }),
            health: Some(proto::ComponentHealth {
                healthy: false,
                last_error: huge.clone(),
                component_health_map: components,
                ..Default::default()
            }),
            effective_config: Some(proto::EffectiveConfig {
                config_map: Some(AgentConfigMap { config_map: [(String::new(), config)].into_iter().collect() }),
            }),
            ..full_state(0)
        };
        let registry = Registry::new();
        handle(&registry, &targets(1), &mut connection(Some(1)), message, 0);
        let record = registry.get(&InstanceUid(UID)).expect("registered");
        let description = record.description.as_deref().expect("description");
        let host = description.host.as_deref().expect("host");
        assert!(host.len() < 2 * VALUE_MAX && host.ends_with(" more bytes not kept]"), "{}", host.len());
        assert_eq!(description.non_identifying.len(), ATTRIBUTES_KEPT + 1);
        assert_eq!(description.non_identifying.last().map(|(_, v)| v.as_str()), Some("37 more attributes not kept"));
        let health = record.health.as_deref().expect("health");
        assert!(health.last_error.len() < 2 * ERROR_MAX);
        assert_eq!(health.components.len(), COMPONENTS_KEPT);
        assert!(health.components.iter().all(|c| c.last_error.len() < 2 * ERROR_MAX));
        let effective = record.effective_config.as_deref().expect("effective config");
        assert!(effective.body.len() < EFFECTIVE_CONFIG_MAX + 100, "{}", effective.body.len());
        let kept = serde_json::to_string(&record.row(&targets(1), 0)).expect("row").len()
            + serde_json::to_string(description).expect("json").len()
            + serde_json::to_string(health).expect("json").len();
        assert!(kept < 2 * 1024 * 1024, "what the API shows of it: {kept} bytes");
    }

    #[test]
    fn a_token_creates_new_instances_within_its_allowance_and_known_ones_are_always_heard() {
        use crate::opamp::registry::NewInstanceLimit;
        let registry = Registry::limiting_new_instances(NewInstanceLimit { burst: 2, per_minute: 60 });
        let send = |uid: u8, token: &str, now_ms: i64| {
            let message = AgentToServer { instance_uid: vec![uid; 16], ..heartbeat(0) };
            let mut connection = Connection { token_id: Arc::from(token), ..connection(None) };
            handle(&registry, &targets(1), &mut connection, message, now_ms).too_many_new
        };
        assert!(!send(1, "tk_00000001", 0) && !send(2, "tk_00000001", 0), "the burst");
        assert!(send(3, "tk_00000001", 0), "past the burst");
        assert!(registry.get(&InstanceUid([3; 16])).is_none(), "a refused instance leaves nothing");
        assert!(!send(1, "tk_00000001", 10), "a known instance is heard");
        assert!(!send(4, "tk_00000002", 10), "another token has its own allowance");
        assert!(!send(3, "tk_00000001", 1_010), "one more a second later, at 60 a minute");
        assert!(send(5, "tk_00000001", 1_020));
    }

    #[test]
    fn first_message_gets_capabilities_and_the_config() {
        let registry = Registry::new();
        let mut connection = connection(Some(1));
        let outcome = handle(&registry, &targets(1), &mut connection, full_state(0), 0);
        assert_eq!(outcome.reply.instance_uid, UID.to_vec(), "echoes instance_uid");
        assert_eq!(outcome.reply.capabilities, SERVER_CAPABILITIES);
        assert_eq!(outcome.reply.flags, 0, "full state was sent");
        let remote = outcome.reply.remote_config.expect("the assigned config");
        assert_eq!(remote.config_hash, vec![1; 32]);
        assert_eq!(remote.config.expect("map").config_map[""].content_type, "text/yaml");
        let record = registry.get(&InstanceUid(UID)).expect("registered");
        assert_eq!(record.description.as_ref().and_then(|d| d.host.clone()).as_deref(), Some("gw-1"));
        assert_eq!(record.status, Status::Applying);
        let second = handle(&registry, &targets(1), &mut connection, heartbeat(1), 10);
        assert_eq!(second.reply.capabilities, 0, "only the first reply");
        assert!(second.reply.remote_config.is_none(), "not sent twice");
    }

    #[test]
    fn a_rotated_token_is_offered_once_per_connection_to_agents_that_accept_it() {
        let registry = Registry::new();
        let mut targets = targets(1);
        rotated(&mut targets, None);
        let accepts =
            |seq| AgentToServer { capabilities: SUPERVISOR | ACCEPTS_OPAMP_CONNECTION_SETTINGS, ..full_state(seq) };

        // Without the capability: no offer.
        let mut plain = connection(Some(1));
        assert!(handle(&registry, &targets, &mut plain, full_state(0), 0).reply.connection_settings.is_none());

        let mut old = connection(Some(2));
        let offer = handle(&registry, &targets, &mut old, accepts(1), 0).reply.connection_settings.expect("an offer");
        let opamp = offer.opamp.expect("OpAMP settings");
        assert_eq!(opamp.destination_endpoint, "ws://gitfleet.test:4320/v1/opamp", "the endpoint it dialled");
        assert_eq!(opamp.heartbeat_interval_seconds, OFFERED_HEARTBEAT_SECONDS);
        assert_eq!(opamp.certificate, None, "a plain endpoint: nothing to verify");
        let headers = opamp.headers.expect("headers").headers;
        assert_eq!(headers.len(), 1);
        assert_eq!(
            (headers[0].key.as_str(), headers[0].value.as_str()),
            ("Authorization", "Bearer tk_00000002.secret")
        );
        assert_eq!(offer.hash.len(), 32);
        assert!(handle(&registry, &targets, &mut old, accepts(2), 1).reply.connection_settings.is_none(), "once");

        // A configured endpoint wins, and changes the hash.
        let mut configured = targets.clone();
        rotated(&mut configured, Some("wss://fleet.example.com:4320/v1/opamp"));
        let mut other = connection(Some(3));
        let second =
            handle(&registry, &configured, &mut other, accepts(3), 2).reply.connection_settings.expect("offer");
        assert_eq!(
            second.opamp.as_ref().map(|o| o.destination_endpoint.as_str()),
            Some("wss://fleet.example.com:4320/v1/opamp")
        );
        assert_ne!(second.hash, offer.hash);
        let certificate = second.opamp.as_ref().and_then(|o| o.certificate.clone()).expect("a wss offer keeps TLS");
        assert!(certificate.ca_cert.starts_with(b"-----BEGIN CERTIFICATE-----"), "with the private CA");
        assert!(certificate.cert.is_empty() && certificate.private_key.is_empty(), "no client certificate");

        // On the current token: nothing to offer.
        let mut current = Connection { token_id: Arc::from("tk_00000002"), ..connection(Some(4)) };
        assert!(handle(&registry, &targets, &mut current, accepts(4), 3).reply.connection_settings.is_none());

        // An instance first seen after the rotation (issued at 100 s), on the old token: it
        // may be whoever leaked it, so it gets no offer, now or later.
        let registry = Registry::new();
        let mut late = connection(Some(5));
        assert!(handle(&registry, &targets, &mut late, accepts(0), 101_000).reply.connection_settings.is_none());
        let mut again = connection(Some(6));
        assert!(handle(&registry, &targets, &mut again, accepts(1), 102_000).reply.connection_settings.is_none());
        // One seen in the rotation's own second counts as before it.
        let registry = Registry::new();
        let mut early = connection(Some(7));
        assert!(handle(&registry, &targets, &mut early, accepts(0), 100_999).reply.connection_settings.is_some());
    }

    #[test]
    fn unknown_instances_and_gaps_get_report_full_state() {
        let registry = Registry::new();
        let mut connection = connection(None);
        let reply = handle(&registry, &targets(1), &mut connection, heartbeat(7), 0).reply;
        assert_eq!(reply.flags, REPORT_FULL_STATE, "unknown instance with compressed status");
        let reply = handle(&registry, &targets(1), &mut connection, full_state(8), 0).reply;
        assert_eq!(reply.flags, 0);
        let reply = handle(&registry, &targets(1), &mut connection, heartbeat(9), 0).reply;
        assert_eq!(reply.flags, 0, "in sequence");
        let reply = handle(&registry, &targets(1), &mut connection, heartbeat(12), 0).reply;
        assert_eq!(reply.flags, REPORT_FULL_STATE, "a gap");
    }

    #[test]
    fn applied_failed_and_no_second_push_of_a_failed_hash() {
        let registry = Registry::new();
        let mut connection = connection(Some(1));
        handle(&registry, &targets(1), &mut connection, full_state(0), 0);
        handle(&registry, &targets(1), &mut connection, status(1, 1, 1, ""), 5);
        assert_eq!(registry.get(&InstanceUid(UID)).expect("record").status, Status::InSync);
        let pushed = handle(&registry, &targets(2), &mut connection, heartbeat(2), 10).reply.remote_config;
        assert_eq!(pushed.map(|r| r.config_hash), Some(vec![2; 32]), "a new assignment goes out");
        handle(&registry, &targets(2), &mut connection, status(3, 2, 3, "bad exporter"), 15);
        let rollback = handle(&registry, &targets(2), &mut connection, status(4, 1, 1, ""), 20);
        assert!(rollback.reply.remote_config.is_none(), "a failed hash is not pushed again");
        let record = registry.get(&InstanceUid(UID)).expect("record");
        assert_eq!(record.status, Status::Failed);
        assert_eq!(record.config.error(), Some("bad exporter"));
        assert!(record.history.iter().any(|h| matches!(h.change, crate::instance::Change::RolledBack { .. })));
    }

    #[test]
    fn an_agent_that_comes_back_without_its_config_gets_it_again() {
        let registry = Registry::new();
        let mut first = connection(Some(1));
        handle(&registry, &targets(1), &mut first, full_state(0), 0);
        handle(&registry, &targets(1), &mut first, status(1, 1, 1, ""), 5);
        assert_eq!(registry.get(&InstanceUid(UID)).expect("record").status, Status::InSync);
        // The same id from a new process that kept nothing: its first message says UNSET.
        for (session, transport_session) in [(2, Some(2)), (3, None)] {
            let mut again = connection(transport_session);
            let outcome = handle(&registry, &targets(1), &mut again, full_state(0), 10 * session);
            let pushed = outcome.reply.remote_config.map(|r| r.config_hash);
            assert_eq!(pushed, Some(vec![1; 32]), "the assigned config again (session {session:?})");
            assert_eq!(registry.get(&InstanceUid(UID)).expect("record").status, Status::Applying);
            handle(&registry, &targets(1), &mut again, status(1, 1, 1, ""), 10 * session + 1);
        }
        // An agent that reports no status at all, started over: sent again too.
        let silent = 0x2847;
        let uid = [0x22; 16];
        let mut connection = connection(Some(9));
        let message = |seq| AgentToServer {
            instance_uid: uid.to_vec(),
            capabilities: silent,
            remote_config_status: None,
            ..full_state(seq)
        };
        assert!(handle(&registry, &targets(1), &mut connection, message(0), 0).reply.remote_config.is_some());
        assert!(handle(&registry, &targets(1), &mut connection, message(1), 1).reply.remote_config.is_none());
        assert!(
            handle(&registry, &targets(1), &mut connection, message(1), 2).reply.remote_config.is_none(),
            "a retry"
        );
        assert!(handle(&registry, &targets(1), &mut connection, message(0), 3).reply.remote_config.is_some());
    }

    #[test]
    fn a_build_s_components_are_asked_for_once_and_shared() {
        let registry = Registry::new();
        let with_components = |uid: u8, seq: u64, components: bool| {
            let mut kinds = std::collections::HashMap::new();
            if components {
                let otlp = proto::ComponentDetails {
                    metadata: vec![KeyValue {
                        key: "code.namespace".into(),
                        value: Some(AnyValue {
                            value: Some(any_value::Value::StringValue(
                                "go.opentelemetry.io/collector/receiver/otlpreceiver v0.158.0".into(),
                            )),
                        }),
                    }],
                    ..Default::default()
                };
                let receivers = proto::ComponentDetails {
                    sub_component_map: [("otlp".to_owned(), otlp)].into_iter().collect(),
                    ..Default::default()
                };
                kinds.insert("receivers".to_owned(), receivers);
            }
            AgentToServer {
                instance_uid: vec![uid; 16],
                capabilities: SUPERVISOR | 0x4000,
                available_components: Some(proto::AvailableComponents { components: kinds, hash: vec![0xab; 32] }),
                ..full_state(seq)
            }
        };
        let mut first = connection(Some(1));
        let reply = handle(&registry, &targets(1), &mut first, with_components(1, 0, false), 0).reply;
        assert_eq!(reply.flags, REPORT_AVAILABLE_COMPONENTS, "an unknown build: asked for its list");
        let reply = handle(&registry, &targets(1), &mut first, with_components(1, 1, true), 1).reply;
        assert_eq!(reply.flags, 0);
        let record = registry.get(&InstanceUid([1; 16])).expect("record");
        let components = record.components.expect("the list");
        assert_eq!(
            components.kinds["receivers"]["otlp"],
            "go.opentelemetry.io/collector/receiver/otlpreceiver v0.158.0"
        );
        // Another instance of the same build sends the hash only: nothing to ask.
        let mut second = connection(Some(2));
        let reply = handle(&registry, &targets(1), &mut second, with_components(2, 0, false), 2).reply;
        assert_eq!(reply.flags, 0);
        let shared = registry.get(&InstanceUid([2; 16])).expect("record").components.expect("shared");
        assert!(Arc::ptr_eq(&shared, &components), "one list per build");
        assert_eq!(registry.take_unsaved_components().len(), 1, "written to the store once");
        assert!(registry.take_unsaved_components().is_empty());
    }

    #[test]
    fn a_huge_component_list_is_cut_to_its_budget() {
        let long = "m".repeat(10_000);
        let many: std::collections::HashMap<String, proto::ComponentDetails> = (0..5_000)
            .map(|i| {
                let details = proto::ComponentDetails {
                    metadata: vec![KeyValue {
                        key: "code.namespace".into(),
                        value: Some(AnyValue { value: Some(any_value::Value::StringValue(long.clone())) }),
                    }],
                    ..Default::default()
                };
                (format!("receiver{i:04}"), details)
            })
            .collect();
        let kinds = proto::ComponentDetails { sub_component_map: many, ..Default::default() };
        let list = available_components(&proto::AvailableComponents {
            components: [("receivers".to_owned(), kinds)].into_iter().collect(),
            hash: vec![1; 32],
        });
        let text: usize = list.kinds["receivers"].iter().map(|(name, about)| name.len() + about.len()).sum();
        assert!(text <= COMPONENTS_TEXT_KEPT, "{text}");
        assert!(list.kinds["receivers"].values().all(|about| about.len() == COMPONENT_TEXT_MAX));
        assert_eq!(list.kinds["receivers"].keys().next().map(String::as_str), Some("receiver0000"), "kept in order");
    }

    #[test]
    fn a_config_reported_applied_while_the_collector_runs_no_pipeline_is_sent_again_once() {
        let registry = Registry::new();
        let mut connection = connection(Some(1));
        let effective = |yaml: &str| proto::EffectiveConfig {
            config_map: Some(AgentConfigMap {
                config_map: [(
                    String::new(),
                    AgentConfigFile { body: yaml.as_bytes().to_vec(), content_type: String::new() },
                )]
                .into_iter()
                .collect(),
            }),
        };
        let idle = "extensions:\n  opamp: {}\nservice:\n  extensions: [opamp]\n";
        let running = "receivers: {otlp: {}}\nexporters: {debug: {}}\nservice:\n  pipelines:\n    traces: {receivers: [otlp], exporters: [debug]}\n";
        let report = |seq, reported: i32, config: &str| AgentToServer {
            effective_config: Some(effective(config)),
            ..status(seq, 1, reported, "")
        };
        // The normal course: it runs the pipelines by the time it says applied.
        let first = AgentToServer { effective_config: Some(effective(idle)), ..full_state(0) };
        assert!(handle(&registry, &targets(1), &mut connection, first, 0).reply.remote_config.is_some());
        handle(&registry, &targets(1), &mut connection, report(1, 2, running), 1);
        let reply = handle(&registry, &targets(1), &mut connection, report(2, 1, running), 2).reply;
        assert!(reply.remote_config.is_none());
        assert_eq!(registry.get(&InstanceUid(UID)).expect("record").status, Status::InSync);

        // The Supervisor's start-up race: applied, but the collector runs its idle start-up config.
        let reply = handle(&registry, &targets(1), &mut connection, report(3, 1, idle), 3).reply;
        assert_eq!(reply.remote_config.map(|r| r.config_hash), Some(vec![1; 32]), "sent again");
        let record = registry.get(&InstanceUid(UID)).expect("record");
        assert_eq!(record.status, Status::Applying);
        assert!(
            record.history.iter().any(|h| h.change == Change::NotRunning { hash: hex::encode([1; 32]), resent: true })
        );
        // Idle again after that: failed, and not sent a third time.
        handle(&registry, &targets(1), &mut connection, report(4, 2, idle), 4);
        let reply = handle(&registry, &targets(1), &mut connection, report(5, 1, idle), 5).reply;
        assert!(reply.remote_config.is_none());
        let record = registry.get(&InstanceUid(UID)).expect("record");
        assert_eq!(record.status, Status::Failed);
        assert!(record.config.error().is_some_and(|e| e.contains("runs no pipeline")));
    }

    #[test]
    fn new_ids_for_invalid_and_requested_uids() {
        let registry = Registry::new();
        let mut bad = connection(Some(2));
        let outcome =
            handle(&registry, &targets(1), &mut bad, AgentToServer { instance_uid: vec![1, 2, 3], ..full_state(0) }, 0);
        assert_eq!(outcome.reply.instance_uid, vec![1, 2, 3], "echoes what it got");
        let new_uid = outcome.reply.agent_identification.expect("a new id").new_instance_uid;
        assert_eq!(new_uid.len(), 16);
        assert_eq!(outcome.uid.0.to_vec(), new_uid);
        let mut requesting = connection(None);
        let request = AgentToServer { flags: REQUEST_INSTANCE_UID, ..full_state(0) };
        assert!(handle(&registry, &targets(1), &mut requesting, request, 0).reply.agent_identification.is_some());
    }

    #[test]
    fn a_reconnect_takes_over_and_a_shared_id_gets_a_new_one() {
        let registry = Registry::new();
        let mut first = connection(Some(1));
        handle(&registry, &targets(1), &mut first, full_state(0), 0);
        // The agent reconnects while its old connection still looks alive: it takes over.
        let mut second = connection(Some(2));
        let outcome = handle(&registry, &targets(1), &mut second, full_state(1), 10);
        assert!(outcome.reply.agent_identification.is_none(), "same identity after a reconnect");
        assert_eq!(registry.get(&InstanceUid(UID)).expect("record").session, Some(2));
        // The old connection speaks again: it was replaced and must go.
        let old = handle(&registry, &targets(1), &mut first, heartbeat(2), 20);
        assert!(old.replaced);
        // Two agents fighting over one id: the third takeover within a minute gets a new id.
        let mut third = connection(Some(3));
        assert!(handle(&registry, &targets(1), &mut third, full_state(0), 30).reply.agent_identification.is_none());
        let mut fourth = connection(Some(4));
        let outcome = handle(&registry, &targets(1), &mut fourth, full_state(0), 40);
        assert!(outcome.reply.agent_identification.is_some(), "shared ids are split");
        assert_ne!(outcome.uid, InstanceUid(UID));
    }

    #[test]
    fn a_disconnect_gets_no_config_and_frees_the_session() {
        let registry = Registry::new();
        let mut connection = connection(Some(1));
        handle(&registry, &targets(1), &mut connection, full_state(0), 0);
        let goodbye = AgentToServer { agent_disconnect: Some(AgentDisconnect {}), ..heartbeat(1) };
        let outcome = handle(&registry, &targets(2), &mut connection, goodbye, 0);
        assert!(outcome.disconnect);
        assert!(outcome.reply.remote_config.is_none());
        assert_eq!(registry.get(&InstanceUid(UID)).expect("record").session, None);
    }
}
