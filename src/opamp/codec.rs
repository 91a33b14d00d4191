//! OpAMP frames and messages as pure functions, so that a fuzzer can call them.
//!
//! - WebSocket: each binary message is a varint header (always 0, one `0x00` byte) followed
//!   by the protobuf. Messages without the header (from before it existed) are accepted:
//!   a protobuf never starts with `0x00`, so the two cannot be confused.
//! - Plain HTTP: the body is the protobuf, possibly gzip-compressed.
//! - Instance ids: 16 bytes; legacy clients send a 26-character ULID string instead.

use std::fmt;
use std::io::Read;

use prost::Message;

use crate::opamp::proto::{AgentToServer, ServerToAgent};

/// Largest message accepted, after decompression. Configurations are at most 4 MiB
/// (`repo::MAX_CONFIG_BYTES`); effective configs and component lists come on top.
pub const MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;

#[derive(Debug, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("message is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("body is not valid gzip: {0}")]
    Gzip(String),
    #[error("not an AgentToServer message: {0}")]
    Protobuf(#[from] prost::DecodeError),
}

/// Decodes one WebSocket binary message from an agent.
pub fn decode_ws_message(payload: &[u8]) -> Result<AgentToServer, DecodeError> {
    if payload.len() > MAX_MESSAGE_BYTES {
        return Err(DecodeError::TooLarge { limit: MAX_MESSAGE_BYTES });
    }
    // The header is a varint that is always 0 in this protocol version, so a leading 0x00
    // is the whole header. Anything else is the legacy format: the payload is the
    // protobuf, and a payload that is neither fails to decode as one.
    let protobuf = payload.strip_prefix(&[0]).unwrap_or(payload);
    Ok(AgentToServer::decode(protobuf)?)
}

/// Encodes a reply as one WebSocket binary message: the `0x00` header, then the protobuf.
pub fn encode_ws_message(message: &ServerToAgent) -> Vec<u8> {
    let mut payload = Vec::with_capacity(1 + message.encoded_len());
    payload.push(0);
    message.encode(&mut payload).expect("a Vec grows as needed");
    payload
}

/// Decodes a plain-HTTP request body, gunzipping it when `gzip` (Content-Encoding: gzip).
/// The size limit applies after decompression.
pub fn decode_http_body(body: &[u8], gzip: bool) -> Result<AgentToServer, DecodeError> {
    if !gzip {
        if body.len() > MAX_MESSAGE_BYTES {
            return Err(DecodeError::TooLarge { limit: MAX_MESSAGE_BYTES });
        }
        return Ok(AgentToServer::decode(body)?);
    }
    let mut inflated = Vec::new();
    flate2::read::GzDecoder::new(body)
        .take(MAX_MESSAGE_BYTES as u64 + 1)
        .read_to_end(&mut inflated)
        .map_err(|error| DecodeError::Gzip(error.to_string()))?;
    if inflated.len() > MAX_MESSAGE_BYTES {
        return Err(DecodeError::TooLarge { limit: MAX_MESSAGE_BYTES });
    }
    Ok(AgentToServer::decode(inflated.as_slice())?)
}

/// Encodes a plain-HTTP reply body.
pub fn encode_http_body(message: &ServerToAgent) -> Vec<u8> {
    message.encode_to_vec()
}

/// Gzips a reply body (when the agent accepts gzip and the body is worth compressing).
pub fn gzip(body: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::with_capacity(body.len() / 2), flate2::Compression::fast());
    encoder.write_all(body).expect("writing to a Vec does not fail");
    encoder.finish().expect("finishing into a Vec does not fail")
}

/// An agent's instance id: 16 bytes, shown as a canonical UUID.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InstanceUid(pub [u8; 16]);

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum InstanceUidError {
    #[error("instance_uid is {0} bytes; it must be 16 bytes (or a 26-character ULID)")]
    WrongLength(usize),
    #[error("instance_uid is 26 bytes but not a ULID")]
    BadUlid,
}

impl InstanceUid {
    /// Reads the `instance_uid` field: 16 raw bytes, or a legacy 26-character ULID.
    pub fn from_wire(bytes: &[u8]) -> Result<Self, InstanceUidError> {
        match bytes.len() {
            16 => Ok(Self(bytes.try_into().expect("length checked"))),
            26 => decode_ulid(bytes).map(Self).ok_or(InstanceUidError::BadUlid),
            other => Err(InstanceUidError::WrongLength(other)),
        }
    }

    /// Parses the canonical text form (`f81d4fae-7dec-11d0-a765-00a0c91e6bf6`).
    pub fn parse(text: &str) -> Option<Self> {
        let hex_digits: String = text.chars().filter(|&c| c != '-').collect();
        if hex_digits.len() != 32 || text.len() != 36 {
            return None;
        }
        let bytes = hex::decode(hex_digits).ok()?;
        Some(Self(bytes.try_into().ok()?))
    }
}

impl fmt::Display for InstanceUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = hex::encode(self.0);
        write!(f, "{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
    }
}

impl fmt::Debug for InstanceUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "InstanceUid({self})")
    }
}

/// Crockford base32 ULID (26 characters, 128 bits) → 16 bytes.
fn decode_ulid(text: &[u8]) -> Option<[u8; 16]> {
    let mut value: u128 = 0;
    for (index, &c) in text.iter().enumerate() {
        let digit = match c.to_ascii_uppercase() {
            c @ b'0'..=b'9' => c - b'0',
            b'O' => 0,
            b'I' | b'L' => 1,
            c @ b'A'..=b'H' => c - b'A' + 10,
            c @ b'J'..=b'K' => c - b'J' + 18,
            c @ b'M'..=b'N' => c - b'M' + 20,
            c @ b'P'..=b'T' => c - b'P' + 22,
            c @ b'V'..=b'Z' => c - b'V' + 27,
            _ => return None,
        };
        // The first character carries only 3 bits (26 × 5 = 130 = 128 + 2).
        if index == 0 && digit > 7 {
            return None;
        }
        value = (value << 5) | u128::from(digit);
    }
    Some(value.to_be_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::opamp::proto::{AgentRemoteConfig, RemoteConfigStatus};

    fn hello() -> AgentToServer {
        AgentToServer {
            instance_uid: vec![7; 16],
            sequence_num: 3,
            capabilities: 0x3847,
            remote_config_status: Some(RemoteConfigStatus {
                last_remote_config_hash: vec![1, 2],
                status: 1,
                error_message: String::new(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn websocket_messages_with_and_without_the_header() {
        let protobuf = hello().encode_to_vec();
        let mut framed = vec![0];
        framed.extend_from_slice(&protobuf);
        assert_eq!(decode_ws_message(&framed), Ok(hello()));
        assert_eq!(decode_ws_message(&protobuf), Ok(hello()), "legacy frames without the header");
        // A header byte alone is an empty message: every field unset.
        assert_eq!(decode_ws_message(&[0]), Ok(AgentToServer::default()));
    }

    #[test]
    fn malformed_websocket_messages() {
        // Header, then a field number of 0, which no protobuf has.
        assert!(matches!(decode_ws_message(&[0x00, 0x05]), Err(DecodeError::Protobuf(_))));
        // No header and a truncated field: not a protobuf either.
        assert!(matches!(decode_ws_message(&[0x80, 0x01]), Err(DecodeError::Protobuf(_))));
        assert!(matches!(decode_ws_message(b"\x01garbage"), Err(DecodeError::Protobuf(_))));
        let truncated = &hello().encode_to_vec()[..5];
        assert!(matches!(decode_ws_message(truncated), Err(DecodeError::Protobuf(_))));
        let huge = vec![0u8; MAX_MESSAGE_BYTES + 1];
        assert_eq!(decode_ws_message(&huge), Err(DecodeError::TooLarge { limit: MAX_MESSAGE_BYTES }));
    }

    #[test]
    fn replies_carry_the_zero_header() {
        let reply = ServerToAgent { instance_uid: vec![7; 16], capabilities: 0x27, ..Default::default() };
        let payload = encode_ws_message(&reply);
        assert_eq!(payload[0], 0);
        assert_eq!(ServerToAgent::decode(&payload[1..]), Ok(reply));
    }

    #[test]
    fn http_bodies_plain_and_gzip() {
        let body = hello().encode_to_vec();
        assert_eq!(decode_http_body(&body, false), Ok(hello()));
        assert_eq!(decode_http_body(&gzip(&body), true), Ok(hello()));
        assert!(matches!(decode_http_body(b"not gzip at all", true), Err(DecodeError::Gzip(_))));
        let bomb = gzip(&vec![0u8; MAX_MESSAGE_BYTES + 10]);
        assert!(bomb.len() < 64 * 1024, "a small body that inflates past the limit");
        assert_eq!(decode_http_body(&bomb, true), Err(DecodeError::TooLarge { limit: MAX_MESSAGE_BYTES }));
        let reply = ServerToAgent {
            remote_config: Some(AgentRemoteConfig { config: None, config_hash: vec![9; 32] }),
            ..Default::default()
        };
        assert_eq!(ServerToAgent::decode(encode_http_body(&reply).as_slice()), Ok(reply));
    }

    #[test]
    fn instance_uids() {
        let uid =
            InstanceUid::from_wire(&hex::decode("f81d4fae7dec11d0a76500a0c91e6bf6").expect("hex")).expect("16 bytes");
        assert_eq!(uid.to_string(), "f81d4fae-7dec-11d0-a765-00a0c91e6bf6");
        assert_eq!(InstanceUid::parse("f81d4fae-7dec-11d0-a765-00a0c91e6bf6"), Some(uid));
        assert_eq!(InstanceUid::parse("f81d4fae7dec11d0a76500a0c91e6bf6"), None);
        assert_eq!(InstanceUid::from_wire(&[1; 15]), Err(InstanceUidError::WrongLength(15)));
        assert_eq!(InstanceUid::from_wire(&[]), Err(InstanceUidError::WrongLength(0)));
        // The ULID example from the ULID specification, and its 128-bit value.
        let ulid = InstanceUid::from_wire(b"01ARZ3NDEKTSV4RRFFQ69G5FAV").expect("ULID");
        assert_eq!(ulid.to_string(), "01563e3a-b5d3-d676-4c61-efb99302bd5b");
        assert_eq!(
            InstanceUid::from_wire(b"81ARZ3NDEKTSV4RRFFQ69G5FAV"),
            Err(InstanceUidError::BadUlid),
            "overflows 128 bits"
        );
        assert_eq!(InstanceUid::from_wire(b"01ARZ3NDEKTSV4RRFFQ69G5FA!"), Err(InstanceUidError::BadUlid));
    }
}
