//! What each fuzz target runs (the targets are in `fuzz/`, driven by `cargo fuzz`). The
//! code lives here so that `cargo test` replays every target's corpus through the very same
//! functions (`tests/system/fuzz.rs`), with no nightly compiler.
//!
//! Each function takes arbitrary bytes, must not panic, and checks what must hold of any
//! input beyond "it did not crash".

use std::sync::Arc;

use crate::opamp::agent::{self, Connection};
use crate::opamp::codec;
use crate::opamp::registry::{InstanceRecord, Registry, Targets, Transport};
use crate::opamp::ws::{Assembler, FRAGMENT_COST, Head, Incoming};
use crate::problem::Severity;

/// What a target runs on one input.
pub type Target = fn(&[u8]);

/// The targets, by the name of their corpus directory under `fuzz/corpus/`.
pub const TARGETS: &[(&str, Target)] = &[
    ("ws_frames", ws_frames),
    ("opamp_message", opamp_message),
    ("http_body", http_body),
    ("fleet_file", fleet_file),
    ("config_yaml", config_yaml),
];

/// Small, so that inputs reach the limit.
const WS_MAX_MESSAGE: usize = 4096;

/// A client's byte stream, read as `FrameReader` reads a connection, up to the first
/// error or the end of the input.
pub fn ws_frames(data: &[u8]) {
    let mut frames = Assembler::new(WS_MAX_MESSAGE);
    let mut rest = data;
    while let Some((first, after)) = rest.split_first_chunk::<2>() {
        let Ok(rest_len) = Head::rest_len(*first) else { return };
        let Some((header, after)) = after.split_at_checked(rest_len) else { return };
        let Ok(head) = Head::decode(*first, header) else { return };
        let Ok(holds) = frames.admit(&head) else { return };
        let control = head.opcode >= 0x8;
        assert!(!control || (head.fin && head.length <= 125), "an admitted control frame is whole and short");
        let payload_cost = head.length as usize + FRAGMENT_COST;
        assert_eq!(holds, if control { 0 } else { payload_cost }, "a data frame holds its payload and its cost");
        let Some((payload, after)) = after.split_at_checked(head.length as usize) else { return };
        match frames.accept(&head, payload.to_vec()) {
            Ok(Some(Incoming::Binary(message))) => {
                assert!(message.len() <= WS_MAX_MESSAGE, "a message within the limit");
                assert!(!frames.in_message(), "a whole message ends the one under way");
            }
            Ok(Some(Incoming::Ping(payload))) => assert!(payload.len() <= 125),
            Ok(_) => {}
            Err(_) => return,
        }
        rest = after;
    }
}

/// One WebSocket message from an agent, decoded and handled twice (first contact, then a
/// known instance) against an empty registry: what is kept stays within the caps.
pub fn opamp_message(data: &[u8]) {
    let Ok(message) = codec::decode_ws_message(data) else { return };
    let registry = Registry::new();
    let targets = Targets::new();
    let mut connection = Connection {
        fleet: Arc::from("fuzz"),
        token_id: Arc::from("tk_fuzz"),
        transport: Transport::WebSocket,
        session: Some(registry.new_session_id()),
        first_reply: true,
        uid: None,
        wire_uid: Vec::new(),
        dialled: None,
        offered: None,
    };
    for now_ms in [1_000, 2_000] {
        let outcome = agent::handle(&registry, &targets, &mut connection, message.clone(), now_ms);
        assert_eq!(outcome.reply.instance_uid, message.instance_uid, "every reply echoes the id sent");
        if outcome.replaced {
            return;
        }
        let record = registry.get(&outcome.uid).expect("a handled message leaves a record");
        assert_within_caps(&record);
    }
}

/// The largest a clipped text can be: its limit, plus the note of what was cut.
fn clipped(max: usize) -> usize {
    max + "… [ more bytes not kept]".len() + 20
}

fn assert_within_caps(record: &InstanceRecord) {
    if let Some(description) = &record.description {
        for pairs in [&description.identifying, &description.non_identifying] {
            assert!(pairs.len() <= agent::ATTRIBUTES_KEPT + 1, "{} attributes kept", pairs.len());
            for (key, value) in pairs.iter() {
                assert!(key.len() <= clipped(agent::KEY_MAX), "a key of {} bytes", key.len());
                assert!(value.len() <= clipped(agent::VALUE_MAX), "a value of {} bytes", value.len());
            }
        }
    }
    if let Some(health) = &record.health {
        assert!(health.status.len() <= clipped(agent::STATUS_MAX));
        assert!(health.last_error.len() <= clipped(agent::ERROR_MAX));
        assert!(health.components.len() <= agent::COMPONENTS_KEPT);
        for component in &health.components {
            assert!(component.name.len() <= clipped(agent::KEY_MAX));
            assert!(component.status.len() <= clipped(agent::STATUS_MAX));
            assert!(component.last_error.len() <= clipped(agent::ERROR_MAX));
        }
    }
    if let Some(effective) = &record.effective_config {
        assert!(effective.content_type.len() <= clipped(agent::KEY_MAX));
        assert!(effective.body.len() <= clipped(agent::EFFECTIVE_CONFIG_MAX));
    }
    for entry in &record.history {
        let size = serde_json::to_string(entry).expect("a history entry serializes").len();
        assert!(size <= clipped(agent::ERROR_MAX) + 512, "a history entry of {size} bytes");
    }
}

/// A plain-HTTP body, as gzip and as it is; a body that decodes plain decodes the same
/// once gzipped.
pub fn http_body(data: &[u8]) {
    let _ = codec::decode_http_body(data, true);
    if let Ok(plain) = codec::decode_http_body(data, false) {
        let gzipped = codec::decode_http_body(&codec::gzip(data), true).expect("the same body, gzipped");
        #[allow(clippy::eq_op, reason = "a message holding a NaN is the one not equal to itself")]
        let comparable = plain == plain;
        if comparable {
            assert_eq!(plain, gzipped);
        } else {
            // Its maps encode in no fixed order, so bytes cannot be compared either: lengths can.
            assert_eq!(prost::Message::encoded_len(&plain), prost::Message::encoded_len(&gzipped));
        }
    }
}

/// A fleet file: either a spec, or an error that says why not.
pub fn fleet_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (spec, problems) = crate::repo::manifest::parse_fleet("fuzz", "fleets/fuzz.toml", text);
    if spec.is_none() {
        assert!(
            problems.iter().any(|problem| problem.severity == Severity::Error),
            "an unusable fleet file gets an error: {problems:?}"
        );
    }
    for problem in &problems {
        assert!(!problem.message.is_empty(), "a problem says what is wrong");
    }
}

/// A collector configuration, through the YAML tree and the lint.
pub fn config_yaml(data: &[u8]) {
    for problem in crate::repo::lint::lint("configs/fuzz.yaml", data) {
        assert!(!problem.message.is_empty(), "a problem says what is wrong");
        assert!(problem.line.is_none_or(|line| line >= 1), "lines count from 1");
    }
    let _ = crate::repo::lint::pipeline_count(&String::from_utf8_lossy(data));
}
