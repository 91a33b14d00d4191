//! gitfleet: a GitOps control plane for fleets of OpenTelemetry Collectors.
//!
//! See `ARCHITECTURE.md` for the map of this crate.
#![forbid(unsafe_code)]

pub mod app;
pub mod bench;
pub mod check;
pub mod client;
pub mod demo;
pub mod duration;
pub mod forge;
#[doc(hidden)]
pub mod fuzzing;
pub mod git;
pub mod import;
pub mod install;
pub mod instance;
pub mod loadgen;
pub mod metrics;
pub mod net;
pub mod opamp;
pub mod plan;
pub mod problem;
pub mod reconciler;
pub mod replica;
pub mod repo;
pub mod reporting;
pub mod rollout;
pub mod settings;
pub mod status;
pub mod store;
pub mod time;
pub mod tls;
pub mod web;
