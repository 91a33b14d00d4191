//! gitfleet: a GitOps control plane for fleets of OpenTelemetry Collectors.
//!
//! See `ARCHITECTURE.md` for the map of this crate.
#![forbid(unsafe_code)]

pub mod duration;
pub mod problem;
pub mod repo;
