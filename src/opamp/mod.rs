//! OpAMP: the protocol collectors (through the OpAMP Supervisor) speak with gitfleet.
//! Only this module knows protobuf.

pub mod agent;
pub mod codec;
pub mod persist;
pub mod registry;
pub mod rollouts;
pub mod server;
pub mod ws;

/// The OpAMP messages, generated from `proto/` (see `tests/system/proto.rs`).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
#[rustfmt::skip]
pub mod proto;
